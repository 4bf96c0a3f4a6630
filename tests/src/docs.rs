//! The commands and examples of Warren's documentation, as the tests read
//! them: every command in a `sh` block of `README.md` and `docs/*.md` is
//! run by a test or by `.ci/run`, and the tests that run one take its text
//! from the document (through [`command`]), so the documentation cannot
//! drift from what is run.

use std::path::{Path, PathBuf};

use crate::operator::repo_root;

/// A fenced block of a Markdown document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// The info string after the opening fence (`sh`, `yaml`, `json`, …).
    pub lang: String,
    /// The lines between the fences.
    pub text: String,
}

/// The documents the rule covers: `README.md` and every `docs/*.md`, as
/// paths relative to the repository.
pub fn documents() -> Vec<String> {
    let root = repo_root();
    let mut docs = vec!["README.md".to_string()];
    let mut more: Vec<String> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    more.sort();
    docs.extend(more);
    docs
}

/// The text of `doc` (relative to the repository).
pub fn read(doc: &str) -> String {
    let path: PathBuf = repo_root().join(doc);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The fenced blocks of a Markdown text, in order.
pub fn blocks(markdown: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<(String, String)> = None;
    for line in markdown.lines() {
        let fence = line.trim_start().strip_prefix("```");
        match (&mut open, fence) {
            (None, Some(info)) => open = Some((info.trim().to_string(), String::new())),
            (Some(_), Some(_)) => {
                let (lang, text) = open.take().expect("an open block");
                out.push(Block { lang, text });
            }
            (Some((_, text)), None) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, None) => {}
        }
    }
    out
}

/// The commands of a shell block: continuation lines (ending in `\`)
/// joined, comment lines and trailing `# …` comments removed, blank lines
/// dropped.
pub fn shell_commands(block: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in block.lines() {
        let line = strip_comment(line);
        let trimmed = line.trim();
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head.trim_end());
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let command = current.trim().to_string();
        current.clear();
        if !command.is_empty() {
            out.push(command);
        }
    }
    out
}

/// `line` without a `#` comment: a `#` at the start or after whitespace,
/// outside quotes.
fn strip_comment(line: &str) -> &str {
    let mut quote: Option<char> = None;
    let mut prev_space = true;
    for (i, c) in line.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == '#' && prev_space => return &line[..i],
            None => {}
        }
        prev_space = c.is_whitespace();
    }
    line
}

/// Every command in a `sh` block of the documents, with the document it
/// is in.
pub fn all_commands() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for doc in documents() {
        for block in blocks(&read(&doc)) {
            if block.lang == "sh" {
                for command in shell_commands(&block.text) {
                    out.push((doc.clone(), command));
                }
            }
        }
    }
    out
}

/// The one command in a `sh` block of `doc` that starts with `prefix`;
/// panics when there is none or more than one, so a test that runs a
/// documented command fails when the documentation changes under it.
pub fn command(doc: &str, prefix: &str) -> String {
    let found: Vec<String> = blocks(&read(doc))
        .into_iter()
        .filter(|b| b.lang == "sh")
        .flat_map(|b| shell_commands(&b.text))
        .filter(|c| c.starts_with(prefix))
        .collect();
    match found.as_slice() {
        [one] => one.clone(),
        [] => panic!("{doc} has no command starting with {prefix:?}"),
        many => panic!("{doc} has several commands starting with {prefix:?}: {many:?}"),
    }
}

/// The commands of the one `sh` block of `doc` whose first command starts
/// with `prefix`, in order (a block meant to be run as a whole).
pub fn block_commands(doc: &str, prefix: &str) -> Vec<String> {
    let found: Vec<Vec<String>> = blocks(&read(doc))
        .into_iter()
        .filter(|b| b.lang == "sh")
        .map(|b| shell_commands(&b.text))
        .filter(|cs| cs.first().is_some_and(|c| c.starts_with(prefix)))
        .collect();
    match found.as_slice() {
        [one] => one.clone(),
        [] => panic!("{doc} has no sh block starting with {prefix:?}"),
        many => panic!("{doc} has several sh blocks starting with {prefix:?}: {many:?}"),
    }
}

/// The commands of the one `sh` block of `doc` that has a command starting
/// with `prefix`, in order: for blocks that start alike (two blocks of
/// `docs/cluster.md` start the control plane).
pub fn block_with(doc: &str, prefix: &str) -> Vec<String> {
    let found: Vec<Vec<String>> = blocks(&read(doc))
        .into_iter()
        .filter(|b| b.lang == "sh")
        .map(|b| shell_commands(&b.text))
        .filter(|cs| cs.iter().any(|c| c.starts_with(prefix)))
        .collect();
    match found.as_slice() {
        [one] => one.clone(),
        [] => panic!("{doc} has no sh block with a command starting with {prefix:?}"),
        many => {
            panic!("{doc} has several sh blocks with a command starting with {prefix:?}: {many:?}")
        }
    }
}

/// `bash -c SCRIPT` in the repository, as a reader would run a documented
/// command from its root.
pub fn bash(script: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new("bash");
    cmd.arg("-c")
        .arg(script)
        .current_dir(repo_root())
        .stdin(std::process::Stdio::null());
    cmd
}

/// The path of `doc` in the repository.
pub fn path(doc: &str) -> PathBuf {
    repo_root().join(Path::new(doc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_join_continuations_and_drop_comments() {
        let block = "# a comment\nscripts/bench            # release build\n\
                     cargo run -p x -- \\\n  --url 'amqp://h/%2f#frag' \\\n  --dir /tmp/x\n\n\
                     eval \"$(scripts/cluster up)\"   # prints exports\n";
        assert_eq!(
            shell_commands(block),
            vec![
                "scripts/bench".to_string(),
                "cargo run -p x -- --url 'amqp://h/%2f#frag' --dir /tmp/x".to_string(),
                "eval \"$(scripts/cluster up)\"".to_string(),
            ]
        );
    }

    #[test]
    fn blocks_keep_their_language() {
        let md = "text\n```sh\na\n```\nmore\n```yaml\nk: v\n```\n";
        assert_eq!(
            blocks(md),
            vec![
                Block {
                    lang: "sh".into(),
                    text: "a\n".into()
                },
                Block {
                    lang: "yaml".into(),
                    text: "k: v\n".into()
                },
            ]
        );
    }
}
