//! The local backend's console and display: the serial log file, SPICE on
//! 127.0.0.1, and screenshots through QMP `screendump`; and why it takes no
//! pushed images.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use qapi::qmp;

use super::LocalBackend;
use crate::backend::{DiskSource, Display, Pushed, Result, SpiceAccess, Templates};
use crate::domain;
use crate::guest::Guest;
use crate::progress::Reporter;
use crate::spec::ImageSpec;

/// The text of the local backend's refusal to take a pushed image.
const NO_PUSH: &str = "local VMs use the image store directly; no push needed";

impl Templates for LocalBackend {
    fn push_image(&self, _: &ImageSpec, _: DiskSource<'_>, _: &dyn Reporter) -> Result<Pushed> {
        Err(crate::backend::Lifecycle::unsupported(
            self,
            "image push",
            NO_PUSH,
        ))
    }
}

impl Display for LocalBackend {
    fn serial_log(&self, name: &str) -> Result<PathBuf> {
        self.require(name)?;
        Ok(self.home.vm_serial_log(name))
    }

    fn spice(&self, name: &str) -> Result<SpiceAccess> {
        let (_, state) = self.require(name)?;
        Ok(SpiceAccess {
            uri: Some(format!(
                "spice://{}:{}",
                domain::LISTEN_ADDRESS,
                state.spice_port
            )),
            viewer_file: None,
        })
    }

    fn screenshot(&self, name: &str, png: &Path) -> Result<(u32, u32)> {
        let (dom, _) = self.require_running(name)?;
        let dom = &dom;
        let ppm = self
            .home
            .vm_dir(name)
            .join(format!(".tmp-screen-{}.ppm", std::process::id()));
        let result = Guest::new(dom)
            .monitor(qmp::screendump {
                filename: ppm.display().to_string(),
                device: None,
                head: None,
                format: None,
            })
            .map_err(|e| anyhow!("{name}: {e}"))
            .and_then(|_| std::fs::read(&ppm).with_context(|| format!("reading {}", ppm.display())))
            .and_then(|data| crate::screenshot::ppm_to_png(&data, png));
        let _ = std::fs::remove_file(&ppm);
        Ok(result?)
    }
}
