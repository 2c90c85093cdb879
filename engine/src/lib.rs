//! mmkd-engine
