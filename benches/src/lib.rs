//! Throughput benchmarks live under benches/benches/.
