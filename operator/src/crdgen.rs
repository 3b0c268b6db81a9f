//! `outrigger crd`: print or write the CRDs generated from `outrigger-crds`.

use std::fs;
use std::io::{self, Write};
use std::path::PathBuf;

use clap::Args;

/// Arguments of `outrigger crd`.
#[derive(Args, Debug)]
pub struct CrdArgs {
    /// Write one file per CRD (`<plural>.yaml`) into this directory (created if
    /// missing) instead of printing them, e.g. `--write crds` or
    /// `--write charts/outrigger/crds`.
    #[arg(long, value_name = "DIR")]
    pub write: Option<PathBuf>,
}

/// Errors of `outrigger crd`.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    #[error("failed to write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("failed to print the CRDs: {0}")]
    Print(#[source] io::Error),
}

/// Prints every CRD as multi-document YAML, or writes them into `--write DIR`.
pub fn run(args: &CrdArgs) -> Result<(), CrdError> {
    let files = outrigger_crds::crd_files();
    match &args.write {
        Some(dir) => {
            fs::create_dir_all(dir).map_err(|source| CrdError::Write {
                path: dir.clone(),
                source,
            })?;
            for file in &files {
                let path = dir.join(&file.file_name);
                fs::write(&path, &file.contents).map_err(|source| CrdError::Write {
                    path: path.clone(),
                    source,
                })?;
                eprintln!("wrote {}", path.display());
            }
            Ok(())
        }
        None => {
            let documents: Vec<&str> = files.iter().map(|f| f.contents.as_str()).collect();
            let mut stdout = io::stdout().lock();
            match stdout.write_all(documents.join("---\n").as_bytes()) {
                // `outrigger crd | head` closes the pipe early; that is not a failure.
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
                result => result.map_err(CrdError::Print),
            }
        }
    }
}
