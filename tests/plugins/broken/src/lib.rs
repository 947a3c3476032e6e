//! Nothing here: the broken plugins are the examples of this package.
