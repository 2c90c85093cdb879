//! mmkd-loaders: the data side of mmkd.
//!
//! Files → shards → batches. [`shard`] is the binary shard format (see `FORMAT.md`),
//! [`dataset`] opens a folder of shards with its manifest, [`pt`] reads and writes PyTorch
//! `.pt` tensor dicts without executing pickle code, [`pack`](mod@pack) imports MMKD-CLIP, manifest and
//! webdataset sources, [`synth`](mod@synth) generates the built-in synthetic data, and [`batch`] streams
//! shuffled, augmented, device-ready batches on worker threads.

pub mod batch;
pub mod dataset;
pub mod features;
pub mod image_proc;
pub mod inspect;
pub mod pack;
pub mod pt;
pub mod reproject;
pub mod shard;
pub mod synth;
pub mod tokenizer;

pub use batch::{Batch, BatchConfig, BatchLoader, Cursor, ImageDtype, TeacherMode};
pub use dataset::{Dataset, FeatureDtype, Manifest, Sample, Tower};
pub use inspect::{inspect, InspectReport};
pub use pack::{pack, PackOptions, PackSummary, SourceFormat};
pub use reproject::{write_reprojected, Projected};
pub use synth::{synth, SynthOptions, SynthSummary};
