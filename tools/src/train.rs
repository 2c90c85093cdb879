//! Train subcommands.

use clap::Subcommand;

#[derive(Subcommand)]
pub enum TrainCommand {}

pub fn run(cmd: TrainCommand) -> anyhow::Result<()> {
    match cmd {}
}
