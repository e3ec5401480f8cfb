use std::fmt;
use std::path::PathBuf;

/// A problem with the fleet file. `Invalid` names the file, line, column and field.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("no agentvm.toml in {} or any parent folder (use --file or AGENTVM_FILE)", start.display())]
    NotFound { start: PathBuf },
    #[error("{}: {message}", file.display())]
    Io { file: PathBuf, message: String },
    #[error("{}", Located { file, line: *line, column: *column, field, message })]
    Invalid {
        file: PathBuf,
        line: usize,
        column: usize,
        field: String,
        message: String,
    },
    #[error("{}: no VM named {name:?} (defined: {})", file.display(), if known.is_empty() { "none".to_string() } else { known.join(", ") })]
    UnknownVm {
        file: PathBuf,
        name: String,
        known: Vec<String>,
    },
}

struct Located<'a> {
    file: &'a PathBuf,
    line: usize,
    column: usize,
    field: &'a str,
    message: &'a str,
}

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}
