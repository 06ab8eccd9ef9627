//! Running the configured power commands (`systemctl reboot` / `systemctl poweroff` by
//! default; tests configure their own).

use std::time::Duration;

/// A power command that has not returned after this long is reported as failed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `argv`; `Err` says why it failed (spawn error, exit status, stderr).
pub async fn run_command(argv: &[String]) -> Result<(), String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("empty power command".into());
    };
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {argv:?}: {e}"))?;
    match tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output()).await {
        Err(_) => Err(format!(
            "{argv:?} did not finish within {COMMAND_TIMEOUT:?}"
        )),
        Ok(Err(e)) => Err(format!("{argv:?} failed: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        // The system is going down: systemd stops the agent's unit, killing the whole group
        // (and `systemctl reboot` with it) before the command could exit. The reboot was
        // accepted; whether it happens, the changed boot id (or the reboot timeout) tells.
        Ok(Ok(out))
            if std::os::unix::process::ExitStatusExt::signal(&out.status)
                == Some(nix::sys::signal::Signal::SIGTERM as i32) =>
        {
            tracing::info!(command = ?argv, "the power command was stopped by SIGTERM: the system is going down");
            Ok(())
        }
        Ok(Ok(out)) => {
            let err: String = String::from_utf8_lossy(&out.stderr)
                .chars()
                .take(500)
                .collect();
            Err(format!(
                "{argv:?} exited with {}: {}",
                out.status,
                err.trim()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_failures_with_the_command() {
        assert!(run_command(&["true".into()]).await.is_ok());
        let e = run_command(&["sh".into(), "-c".into(), "echo no >&2; exit 3".into()])
            .await
            .unwrap_err();
        assert!(e.contains("exit status: 3") && e.contains("no"), "{e}");
        let e = run_command(&["/nonexistent/power".into()])
            .await
            .unwrap_err();
        assert!(e.contains("/nonexistent/power"), "{e}");
    }

    #[tokio::test]
    async fn a_command_stopped_by_the_shutdown_it_started_counts_as_issued() {
        // As `systemctl reboot` is when systemd stops the agent's unit on the way down.
        assert!(
            run_command(&["sh".into(), "-c".into(), "kill -TERM $$".into()])
                .await
                .is_ok()
        );
        let e = run_command(&["sh".into(), "-c".into(), "kill -KILL $$".into()])
            .await
            .unwrap_err();
        assert!(e.contains("signal"), "{e}");
    }
}
