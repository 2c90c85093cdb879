//! Data subcommands.

use clap::Subcommand;

#[derive(Subcommand)]
pub enum DataCommand {}

pub fn run(cmd: DataCommand) -> anyhow::Result<()> {
    match cmd {}
}
