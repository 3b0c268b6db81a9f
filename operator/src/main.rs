//! `outrigger`: keeps GPU model serving diversified across clouds.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

mod children;
mod cloud;
mod controller;
mod crdgen;
mod inputs;
mod labels;
mod leader;
mod lifecycle;
mod observe;
mod peer_cli;
mod plan;
mod run;
mod scaling;
mod status;
mod telemetry;
mod validate;

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
    /// Preview placements offline: plan the ModelDeployments in the files onto their GpuNodePools.
    Plan(plan::PlanArgs),
    /// Run the operator: watch ModelDeployments and keep their replicas placed.
    Run(Box<run::RunArgs>),
    /// Register another cluster as a peer of this one (`peer add`), or undo it (`peer remove`).
    Peer(Box<peer_cli::PeerArgs>),
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let (Command::Plan(args), Some(("plan", plan))) = (&mut cli.command, matches.subcommand())
        && let Err(e) = args.place_clusters(plan)
    {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    match &cli.command {
        Command::Crd(args) => match crdgen::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Peer(args) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime starts");
            match runtime.block_on(peer_cli::run(args)) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime starts");
            match runtime.block_on(run::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "outrigger stopped");
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        // Bad input exits 2, like kubectl's usage errors.
        Command::Plan(args) => match plan::run(args) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
    }
}
