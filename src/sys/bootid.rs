//! The kernel's boot id, which tells the agent whether the machine rebooted since it last
//! wrote its state (a script "running" under an old boot id was cut off by the reboot).

use std::path::Path;

pub const DEFAULT_BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// Reads and trims the boot id; an empty file is an error, not an id.
pub fn read_boot_id(path: &Path) -> std::io::Result<String> {
    let id = std::fs::read_to_string(path)?.trim().to_string();
    if id.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_trimmed_and_rejects_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("boot_id");
        std::fs::write(&p, "abc-123\n").unwrap();
        assert_eq!(read_boot_id(&p).unwrap(), "abc-123");
        std::fs::write(&p, "\n").unwrap();
        assert!(read_boot_id(&p).is_err());
    }
}
