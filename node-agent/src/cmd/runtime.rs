//! `shoal runtime …`: the runc-style CLI over an OCI bundle.

use clap::Subcommand;

#[derive(Subcommand)]
pub enum RuntimeCommand {}

pub fn run(cmd: RuntimeCommand) -> anyhow::Result<()> {
    match cmd {}
}
