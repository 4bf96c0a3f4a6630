//! An error with its causes on one line, the form both the operator and
//! the sidecar show in logs, status and events.

use std::error::Error;

/// `e`'s text followed by each cause from [`Error::source`], joined with
/// `": "`, e.g. "error sending request: client error (Connect): tcp connect
/// error: Connection refused (os error 111)".
///
/// A cause whose text the line already holds is left out: many errors
/// print their cause in their own message and return it from `source()`
/// as well. An `anyhow::Error` is passed as `e.as_ref()`.
pub fn error_chain(e: &(dyn Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt;

    /// A test error: its own words, and optionally a cause.
    #[derive(Debug)]
    struct Layer {
        text: &'static str,
        cause: Option<Box<Layer>>,
    }

    impl Layer {
        fn new(text: &'static str, cause: Option<Layer>) -> Self {
            Self {
                text,
                cause: cause.map(Box::new),
            }
        }
    }

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.text)
        }
    }

    impl Error for Layer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.cause.as_deref().map(|c| c as _)
        }
    }

    #[test]
    fn a_chain_of_three_is_joined_outermost_first() {
        let e = Layer::new(
            "error sending request",
            Some(Layer::new(
                "tcp connect error",
                Some(Layer::new("Connection refused (os error 111)", None)),
            )),
        );
        assert_eq!(
            error_chain(&e),
            "error sending request: tcp connect error: Connection refused (os error 111)"
        );
    }

    #[test]
    fn a_cause_the_message_already_holds_is_not_repeated() {
        let e = Layer::new(
            "IO error: Connection reset by peer",
            Some(Layer::new(
                "Connection reset by peer",
                Some(Layer::new("broken pipe", None)),
            )),
        );
        assert_eq!(
            error_chain(&e),
            "IO error: Connection reset by peer: broken pipe"
        );
    }

    #[test]
    fn a_single_error_is_its_own_text() {
        let e = Layer::new("invalid configuration", None);
        assert_eq!(error_chain(&e), "invalid configuration");
    }
}
