//! The one font the host draws text with (plots, synthetic OCR images), embedded so
//! that no system font is needed: DejaVu Sans (licence in `host/assets/fonts/LICENSE-DejaVu`).

/// DejaVu Sans (TrueType), as shipped by Debian's `fonts-dejavu-core`.
pub static DEJAVU_SANS: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

/// The name plots ask for; [`register_plot_font`] makes plotters draw it with [`DEJAVU_SANS`].
pub const PLOT_FONT: &str = "sans-serif";

/// Register [`DEJAVU_SANS`] with plotters under [`PLOT_FONT`] (idempotent, thread-safe).
pub fn register_plot_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TrueType font (checked by the test below), so this cannot fail.
        let _ = plotters::style::register_font(PLOT_FONT, plotters::style::FontStyle::Normal, DEJAVU_SANS);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_font_parses() {
        let font = ab_glyph::FontRef::try_from_slice(DEJAVU_SANS).expect("DejaVu Sans parses");
        use ab_glyph::Font;
        assert_ne!(font.glyph_id('A').0, 0, "the font has a glyph for 'A'");
    }
}
