//! A plugin whose code panics: the panic must reach the host as an error, not
//! abort the process.

use vlmhost_plugin_api::{export_plugin, FamilyInfo, Plugin};

pub struct Panicking;

impl Plugin for Panicking {
    fn families() -> Vec<FamilyInfo> {
        let families: Vec<FamilyInfo> = Vec::new();
        // An index out of bounds, as a real bug would be.
        vec![families[3].clone()]
    }
}

export_plugin!(Panicking);
