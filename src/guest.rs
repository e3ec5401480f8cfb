//! Talking to a running guest: typed QMP commands to QEMU and typed guest agent
//! (QGA) commands to the guest, both through libvirt's pass-through APIs. The
//! commands and replies are `qapi` types; this module only frames and sends them.

use std::time::Duration;

use qapi::{Command, Execute};
use serde::Deserialize;
use virt::domain::Domain;
use virt::enumutil::Enum;
use virt::error::ErrorNumber;

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The guest agent is not there or does not answer.
    #[error("the guest agent is not responding: {0}")]
    AgentUnavailable(String),
    /// QEMU or the agent answered with an error.
    #[error("{command} failed: {class}: {desc}")]
    Command {
        command: &'static str,
        class: String,
        desc: String,
    },
    #[error("{command}: {message}")]
    Libvirt {
        command: &'static str,
        message: String,
    },
    #[error("{command}: unreadable reply: {message}")]
    Reply {
        command: &'static str,
        message: String,
    },
}

/// A running domain's QMP monitor and guest agent.
pub struct Guest<'a> {
    dom: &'a Domain,
}

impl<'a> Guest<'a> {
    pub fn new(dom: &'a Domain) -> Self {
        Self { dom }
    }

    /// Runs a QGA command, waiting at most `timeout` for the agent.
    pub fn agent<C: Command>(&self, command: C, timeout: Duration) -> Result<C::Ok, GuestError> {
        let request = encode(command);
        let seconds = i32::try_from(timeout.as_secs().max(1)).unwrap_or(i32::MAX);
        let reply = self
            .dom
            .qemu_agent_command(&request, seconds, 0)
            .map_err(|e| {
                if agent_missing(&e) {
                    GuestError::AgentUnavailable(e.message().to_string())
                } else {
                    GuestError::Libvirt {
                        command: C::NAME,
                        message: e.message().to_string(),
                    }
                }
            })?;
        decode::<C>(&reply)
    }

    /// Runs a QMP command on the domain's monitor.
    pub fn monitor<C: Command>(&self, command: C) -> Result<C::Ok, GuestError> {
        let request = encode(command);
        let reply =
            self.dom
                .qemu_monitor_command(&request, 0)
                .map_err(|e| GuestError::Libvirt {
                    command: C::NAME,
                    message: e.message().to_string(),
                })?;
        decode::<C>(&reply)
    }
}

fn encode<C: Command>(command: C) -> String {
    serde_json::to_string(&Execute::<C>::new(command, None))
        .expect("qapi commands serialize to JSON")
}

/// A QMP/QGA reply: the command's return value or a qapi error.
#[derive(Deserialize)]
#[serde(untagged)]
enum Reply<T> {
    Return {
        #[serde(rename = "return")]
        value: T,
    },
    /// qapi's own error type reads the whole `{"error": {...}}` reply.
    Error(qapi::Error),
}

fn decode<C: Command>(reply: &str) -> Result<C::Ok, GuestError> {
    let parsed: Reply<C::Ok> = serde_json::from_str(reply).map_err(|e| GuestError::Reply {
        command: C::NAME,
        message: format!("{e}: {reply}"),
    })?;
    match parsed {
        Reply::Return { value } => Ok(value),
        Reply::Error(error) => Err(GuestError::Command {
            command: C::NAME,
            class: format!("{:?}", error.class),
            desc: error.desc,
        }),
    }
}

/// libvirt's ways of saying there is no agent to talk to.
fn agent_missing(e: &virt::error::Error) -> bool {
    matches!(
        e.code(),
        Enum::Known(
            ErrorNumber::AgentUnresponsive
                | ErrorNumber::AgentUnsynced
                | ErrorNumber::AgentCommandTimeout
                | ErrorNumber::OperationInvalid
                | ErrorNumber::ArgumentUnsupported
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use qapi::qga;

    #[test]
    fn commands_are_framed_as_qapi_execute() {
        let json: serde_json::Value = serde_json::from_str(&encode(qga::guest_exec {
            path: "/bin/sh".into(),
            arg: Some(vec!["-c".into(), "true".into()]),
            env: None,
            input_data: None,
            capture_output: Some(qga::GuestExecCaptureOutput::flag(true)),
        }))
        .unwrap();
        assert_eq!(json["execute"], "guest-exec");
        assert_eq!(json["arguments"]["path"], "/bin/sh");
        assert_eq!(json["arguments"]["capture-output"], true);
    }

    #[test]
    fn replies_decode_into_qapi_types_and_errors_are_typed() {
        let status = decode::<qga::guest_exec_status>(
            r#"{"return":{"exited":true,"exitcode":3,"out-data":"aGkK"}}"#,
        )
        .unwrap();
        assert!(status.exited);
        assert_eq!(status.exitcode, Some(3));
        assert_eq!(status.out_data.as_deref(), Some(&b"hi\n"[..]));
        let err = decode::<qga::guest_file_open>(
            r#"{"error":{"class":"GenericError","desc":"failed to open file '/nope'"}}"#,
        )
        .unwrap_err();
        assert!(
            matches!(&err, GuestError::Command { command: "guest-file-open", desc, .. } if desc.contains("/nope")),
            "{err:?}"
        );
    }
}
