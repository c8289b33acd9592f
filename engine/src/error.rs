//! The one error type pipit distinguishes: input the user got wrong.
//!
//! Everything else is an ordinary `anyhow::Error`. The CLI walks an error's chain and exits
//! with status 2 when it finds an [`InvalidInput`], 1 otherwise.

use std::fmt;

/// A user mistake: a value that breaks a stated constraint. The message names both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidInput(pub String);

impl fmt::Display for InvalidInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidInput {}

/// True when `err` or anything in its chain is an [`InvalidInput`].
pub fn is_invalid_input(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.is::<InvalidInput>())
}

/// Return early with an [`InvalidInput`] error built like `format!`.
#[macro_export]
macro_rules! invalid {
    ($($arg:tt)*) => {
        return Err(anyhow::Error::new($crate::error::InvalidInput(format!($($arg)*))))
    };
}

/// Make an [`InvalidInput`] error (as a value) built like `format!`.
#[macro_export]
macro_rules! invalid_input {
    ($($arg:tt)*) => {
        anyhow::Error::new($crate::error::InvalidInput(format!($($arg)*)))
    };
}
