//! mmkd-loaders
