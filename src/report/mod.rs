//! Reports: the result of one action as the flow engine receives it, the
//! rules that turn what happened in the container into that result
//! (ISOLATE.md section 4), and their delivery (`flow`).
//!
//! Owns the error codes of the contract. Does not read files or talk to
//! containerd: the runner collects, this module decides.

pub mod flow;

use std::time::Duration;

use crate::proto::flow::ReportActionResultsRequest;

/// The error codes a report can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Io,
    Exit,
    Oom,
    Timeout,
    Cancelled,
    Image,
    Network,
    Internal,
}

impl ErrorCode {
    /// Every code of the contract (ISOLATE.md §4).
    pub const ALL: [ErrorCode; 8] = [
        ErrorCode::Io,
        ErrorCode::Exit,
        ErrorCode::Oom,
        ErrorCode::Timeout,
        ErrorCode::Cancelled,
        ErrorCode::Image,
        ErrorCode::Network,
        ErrorCode::Internal,
    ];

    /// The contract's code `code` is, if it is one (error.json may carry
    /// any string).
    pub fn of(code: &str) -> Option<ErrorCode> {
        Self::ALL.into_iter().find(|c| c.as_str() == code)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Io => "au.com.direktiv.error.io",
            ErrorCode::Exit => "au.com.direktiv.error.exit",
            ErrorCode::Oom => "au.com.direktiv.error.oom",
            ErrorCode::Timeout => "au.com.direktiv.error.timeout",
            ErrorCode::Cancelled => "au.com.direktiv.error.cancelled",
            ErrorCode::Image => "au.com.direktiv.error.image",
            ErrorCode::Network => "au.com.direktiv.error.network",
            ErrorCode::Internal => "au.com.direktiv.error.internal",
        }
    }
}

/// How an action ended, as far as the flow engine is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Output(Vec<u8>),
    /// A failure; the code is a string because error.json's codes are the
    /// action's own.
    Failed {
        code: String,
        message: String,
    },
}

impl Outcome {
    pub fn failed(code: ErrorCode, message: impl Into<String>) -> Self {
        Outcome::Failed {
            code: code.as_str().to_string(),
            message: message.into(),
        }
    }

    /// The outcome a stored report carries.
    pub fn from_wire(r: &ReportActionResultsRequest) -> Self {
        match &r.error_code {
            Some(code) => Outcome::Failed {
                code: code.clone(),
                message: r.error_message.clone().unwrap_or_default(),
            },
            None => Outcome::Output(r.output.clone().unwrap_or_default()),
        }
    }

    /// The code of a failure, for logs and metrics.
    pub fn code(&self) -> Option<&str> {
        match self {
            Outcome::Output(_) => None,
            Outcome::Failed { code, .. } => Some(code),
        }
    }
}

/// One action's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub instance_id: Option<String>,
    pub step: Option<i32>,
    pub action_id: String,
    pub outcome: Outcome,
}

impl Report {
    pub fn to_wire(&self) -> ReportActionResultsRequest {
        let mut r = ReportActionResultsRequest {
            instance_id: self.instance_id.clone(),
            step: self.step,
            action_id: Some(self.action_id.clone()),
            ..Default::default()
        };
        match &self.outcome {
            Outcome::Output(out) => r.output = Some(out.clone()),
            Outcome::Failed { code, message } => {
                r.error_code = Some(code.clone());
                r.error_message = Some(message.clone());
            }
        }
        r
    }
}

/// Why the action's process stopped, when isolated stopped it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    Timeout(Duration),
    Cancelled(String),
}

/// Everything collected from a finished container.
#[derive(Debug)]
pub struct Collected {
    pub exit_code: u32,
    pub oom: bool,
    /// The memory limit in bytes, for the oom message.
    pub memory_limit: i64,
    pub stopped: Option<Stopped>,
    /// `/direktiv-data/error.json`, if present (at most [`ERROR_JSON_MAX`] bytes).
    pub error_json: Option<Vec<u8>>,
    /// `data.out` (absent: empty output), or why it cannot be used.
    pub data_out: Result<Option<Vec<u8>>, String>,
    /// The tail of stderr.
    pub stderr_tail: Vec<u8>,
}

impl Default for Collected {
    fn default() -> Self {
        Collected {
            exit_code: 0,
            oom: false,
            memory_limit: 0,
            stopped: None,
            error_json: None,
            data_out: Ok(None),
            stderr_tail: Vec::new(),
        }
    }
}

/// error.json is a code and a message; anything bigger is not one.
pub const ERROR_JSON_MAX: usize = 64 << 10;

/// How much of stderr goes into an exit error's message.
const STDERR_IN_MESSAGE: usize = 2048;

impl Collected {
    /// The table of ISOLATE.md section 4, first matching row wins: what
    /// isolated did to the process, then what the kernel did, then what the
    /// action said, then how it exited.
    pub fn outcome(self) -> Outcome {
        match self.stopped {
            Some(Stopped::Timeout(t)) => {
                return Outcome::failed(
                    ErrorCode::Timeout,
                    format!("action timed out after {} s", t.as_secs()),
                )
            }
            Some(Stopped::Cancelled(why)) => return Outcome::failed(ErrorCode::Cancelled, why),
            None => {}
        }
        if self.oom {
            return Outcome::failed(
                ErrorCode::Oom,
                format!(
                    "action was killed for exceeding its memory limit of {} MiB",
                    self.memory_limit >> 20
                ),
            );
        }
        if let Some(bytes) = self.error_json {
            return parse_error_json(&bytes);
        }
        if self.exit_code != 0 {
            let tail = one_line_tail(&self.stderr_tail, STDERR_IN_MESSAGE);
            let how = killed_by(self.exit_code);
            let msg = if tail.is_empty() {
                format!("action exited with code {}{how}", self.exit_code)
            } else {
                format!("action exited with code {}{how}: {tail}", self.exit_code)
            };
            return Outcome::failed(ErrorCode::Exit, msg);
        }
        match self.data_out {
            Ok(out) => Outcome::Output(out.unwrap_or_default()),
            Err(why) => Outcome::failed(ErrorCode::Io, why),
        }
    }
}

/// Names the signal behind an exit code above 128, the way a shell and
/// containerd report a process killed by one. SIGSYS gets its usual cause
/// here, so an action author need not know the profile to find it.
fn killed_by(exit_code: u32) -> String {
    use nix::sys::signal::Signal;
    match exit_code
        .checked_sub(128)
        .and_then(|n| Signal::try_from(n as i32).ok())
    {
        Some(Signal::SIGSYS) => " (killed by SIGSYS: a system call the seccomp profile refuses, \
                                such as a 32-bit one)"
            .to_string(),
        Some(signal) => format!(" (killed by {signal})"),
        None => String::new(),
    }
}

#[derive(serde::Deserialize)]
struct ErrorJson {
    #[serde(rename = "errorCode")]
    error_code: Option<String>,
    #[serde(rename = "errorMessage")]
    error_message: Option<String>,
}

fn parse_error_json(bytes: &[u8]) -> Outcome {
    let head = || one_line_head(bytes, 200);
    match serde_json::from_slice::<ErrorJson>(bytes) {
        Ok(ErrorJson {
            error_code: Some(code),
            error_message,
        }) if !code.is_empty() => Outcome::Failed {
            code,
            message: error_message.unwrap_or_default(),
        },
        Ok(_) => Outcome::failed(
            ErrorCode::Io,
            format!("error.json has no errorCode: {}", head()),
        ),
        Err(e) => Outcome::failed(
            ErrorCode::Io,
            format!("error.json is not valid JSON ({e}): {}", head()),
        ),
    }
}

/// The last `max` bytes of `bytes` as one line of text.
pub fn one_line_tail(bytes: &[u8], max: usize) -> String {
    let start = bytes.len().saturating_sub(max);
    flatten(&String::from_utf8_lossy(&bytes[start..]))
}

fn one_line_head(bytes: &[u8], max: usize) -> String {
    flatten(&String::from_utf8_lossy(&bytes[..bytes.len().min(max)]))
}

fn flatten(s: &str) -> String {
    s.split(['\n', '\r'])
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done() -> Collected {
        Collected {
            data_out: Ok(Some(b"out".to_vec())),
            memory_limit: 256 << 20,
            ..Default::default()
        }
    }

    fn code(o: &Outcome) -> &str {
        o.code().unwrap_or("")
    }

    #[test]
    fn success_is_data_out_or_empty() {
        assert_eq!(done().outcome(), Outcome::Output(b"out".to_vec()));
        let c = Collected {
            data_out: Ok(None),
            ..done()
        };
        assert_eq!(c.outcome(), Outcome::Output(vec![]));
    }

    #[test]
    fn error_json_wins_over_exit_code() {
        for exit_code in [0, 5] {
            let c = Collected {
                exit_code,
                error_json: Some(
                    br#"{"errorCode":"com.x.bad","errorMessage":"it broke"}"#.to_vec(),
                ),
                ..done()
            };
            assert_eq!(
                c.outcome(),
                Outcome::Failed {
                    code: "com.x.bad".into(),
                    message: "it broke".into()
                }
            );
        }
    }

    #[test]
    fn broken_error_json_is_io_with_its_head() {
        let c = Collected {
            error_json: Some(b"{not json".to_vec()),
            ..done()
        };
        let o = c.outcome();
        assert_eq!(code(&o), ErrorCode::Io.as_str());
        let Outcome::Failed { message, .. } = o else {
            unreachable!()
        };
        assert!(message.contains("{not json"), "{message}");
        let c = Collected {
            error_json: Some(br#"{"errorMessage":"x"}"#.to_vec()),
            ..done()
        };
        assert_eq!(code(&c.outcome()), ErrorCode::Io.as_str());
    }

    #[test]
    fn exit_carries_code_and_stderr_tail() {
        let c = Collected {
            exit_code: 3,
            stderr_tail: b"line one\nboom\n".to_vec(),
            ..done()
        };
        let o = c.outcome();
        assert_eq!(code(&o), ErrorCode::Exit.as_str());
        let Outcome::Failed { message, .. } = o else {
            unreachable!()
        };
        assert_eq!(message, "action exited with code 3: line one | boom");
    }

    #[test]
    fn exit_names_the_signal_that_killed() {
        let message = |exit_code| {
            let c = Collected {
                exit_code,
                ..done()
            };
            let Outcome::Failed { message, .. } = c.outcome() else {
                unreachable!()
            };
            message
        };
        assert_eq!(
            message(137),
            "action exited with code 137 (killed by SIGKILL)"
        );
        assert!(message(159).contains("SIGSYS: a system call the seccomp profile refuses"));
        assert_eq!(message(3), "action exited with code 3");
        assert_eq!(message(200), "action exited with code 200");
    }

    #[test]
    fn precedence_timeout_then_oom() {
        let c = Collected {
            exit_code: 137,
            oom: true,
            stopped: Some(Stopped::Timeout(Duration::from_secs(2))),
            ..done()
        };
        assert_eq!(code(&c.outcome()), ErrorCode::Timeout.as_str());
        let c = Collected {
            exit_code: 137,
            oom: true,
            error_json: Some(b"{}".to_vec()),
            ..done()
        };
        let o = c.outcome();
        assert_eq!(code(&o), ErrorCode::Oom.as_str());
        let Outcome::Failed { message, .. } = o else {
            unreachable!()
        };
        assert!(message.contains("256 MiB"), "{message}");
        let c = Collected {
            stopped: Some(Stopped::Cancelled("by op".into())),
            ..done()
        };
        assert_eq!(code(&c.outcome()), ErrorCode::Cancelled.as_str());
    }

    #[test]
    fn unusable_output_is_io() {
        let c = Collected {
            data_out: Err("data.out is 40 MiB, above the output limit".into()),
            ..done()
        };
        assert_eq!(code(&c.outcome()), ErrorCode::Io.as_str());
    }

    #[test]
    fn wire_fields() {
        let r = Report {
            instance_id: Some("i".into()),
            step: Some(2),
            action_id: "a".into(),
            outcome: Outcome::Output(vec![0, 255]),
        };
        let w = r.to_wire();
        assert_eq!(w.output, Some(vec![0, 255]));
        assert_eq!(w.error_code, None);
        assert_eq!(w.error_message, None);
        assert_eq!(w.step, Some(2));
    }
}
