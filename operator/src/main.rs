//! `outrigger`: keeps GPU model serving diversified across clouds.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod crdgen;

/// Outrigger keeps GPU model-serving replicas spread over AWS and Azure GPU pools.
#[derive(Parser, Debug)]
#[command(name = "outrigger", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML, or write them with --write DIR.
    Crd(crdgen::CrdArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Crd(args) => crdgen::run(args).map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
