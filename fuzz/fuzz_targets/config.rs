//! Fuzz target: the agent's and the controller's TOML configs. No input may panic; a refusal
//! names the file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let origin = Path::new("/etc/fieldhand/fuzz.toml");
    if let Err(e) = fieldhand::config::agent::AgentConfig::parse(text, origin) {
        assert!(e.to_string().contains("fuzz.toml"), "{e}");
    }
    if let Err(e) = fieldhand::config::controller::ControllerConfig::parse(text, origin) {
        assert!(e.to_string().contains("fuzz.toml"), "{e}");
    }
});
