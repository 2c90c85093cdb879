//! mmkd-kernels
