//! The guest side of `cp` as POSIX shell: quoting for the remote shell SSH
//! hands its command to, the scripts both paths run, and reading their output.

/// `text` as one word for a POSIX shell: in single quotes, each `'` written
/// as `'\''`. Words of only safe characters stay as they are.
pub fn quote(text: &str) -> String {
    let safe = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@%".contains(&b));
    if safe {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// The command line running `script` with `sh -c`, `$1`… being `args`.
pub fn command_line(script: &str, args: &[&str]) -> String {
    let mut line = format!("sh -c {} sh", quote(script));
    for arg in args {
        line.push(' ');
        line.push_str(&quote(arg));
    }
    line
}

/// Prints `$1` made absolute (relative to `$HOME`) on one line, then what is
/// there: `missing`, or `<raw mode in hex> <permission bits> <size>` of the
/// file it names (links followed).
pub const PROBE: &str = r#"case $1 in /*) p=$1 ;; "") p=$HOME ;; *) p=$HOME/$1 ;; esac
printf '%s\n' "$p"
if [ -e "$p" ]; then exec stat -L -c '%f %a %s' -- "$p"; else echo missing; fi"#;

/// Lists the tree `$1`: one line per entry, `<raw mode in hex> <permission
/// bits> <size> <path>` (names with line breaks are not supported).
pub const LIST_TREE: &str = r#"exec find "$1" -exec stat -c '%f %a %s %n' {} +"#;

/// Takes a file on stdin into `$1` (a temporary name), gives it mode `$2` and
/// renames it to `$3` (never into a folder there); the temporary file is
/// removed whatever happens.
pub const RECEIVE_FILE: &str = r#"trap 'rm -f -- "$1"' EXIT
if [ -d "$3" ]; then echo "$3: is a directory" >&2; exit 1; fi
cat > "$1" && chmod "$2" "$1" && mv -f -- "$1" "$3""#;

/// Makes the folder `$1` (a temporary name) and unpacks a tar archive from
/// stdin into it, then installs `$1/$2` as `$3` (see [`INSTALL_TREE`]).
pub const RECEIVE_TREE: &str = r#"trap 'rm -rf -- "$1"' EXIT
rm -rf -- "$1" && mkdir -- "$1" && tar -C "$1" --no-same-owner -xpf - || exit
if [ -d "$3" ]; then cp -pR -- "$1/$2/." "$3/"; else mv -- "$1/$2" "$3"; fi"#;

/// Installs the tree `$1/$2` as `$3` (merged into `$3` when it is a folder)
/// and removes `$1`.
pub const INSTALL_TREE: &str = r#"trap 'rm -rf -- "$1"' EXIT
if [ -d "$3" ]; then cp -pR -- "$1/$2/." "$3/"; else mv -- "$1/$2" "$3"; fi"#;

/// Writes the tree `$2` of folder `$1` to stdout as a tar archive.
pub const SEND_TREE: &str = r#"exec tar -C "$1" -cf - -- "$2""#;

/// Makes each folder named in the arguments (with its parents).
pub const MAKE_DIRS: &str = r#"exec mkdir -p -- "$@""#;

/// Sets modes: the arguments are pairs of octal mode and path.
pub const CHMOD_PAIRS: &str = r#"while [ $# -ge 2 ]; do chmod "$1" "$2" || exit; shift 2; done"#;

/// Renames `$1` to `$2`, replacing a file there (never moving into a folder there).
pub const RENAME: &str = r#"if [ -d "$2" ]; then echo "$2: is a directory" >&2; exit 1; fi
exec mv -f -- "$1" "$2""#;

/// Removes `$1` and what it holds.
pub const REMOVE: &str = r#"exec rm -rf -- "$1""#;

/// A file's type, as the raw mode's type bits say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

/// One entry of [`PROBE`] or [`LIST_TREE`] output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    pub mode: u32,
    pub size: u64,
    pub path: String,
}

/// Reads `<raw mode hex> <mode octal> <size>[ <path>]`.
pub fn parse_entry(line: &str) -> Option<Entry> {
    let mut fields = line.splitn(4, ' ');
    let raw = u32::from_str_radix(fields.next()?, 16).ok()?;
    let mode = u32::from_str_radix(fields.next()?, 8).ok()?;
    let size = fields.next()?.trim().parse().ok()?;
    let path = fields.next().unwrap_or_default().to_string();
    let kind = match raw & 0o170000 {
        0o100000 => Kind::File,
        0o040000 => Kind::Dir,
        0o120000 => Kind::Symlink,
        _ => Kind::Other,
    };
    Some(Entry {
        kind,
        mode: mode & 0o7777,
        size,
        path,
    })
}

/// The folder and last part of a guest path (`/a/b` → `/a`, `b`).
pub fn split(path: &str) -> (String, String) {
    let trimmed = path.trim_end_matches('/');
    match trimmed.rsplit_once('/') {
        Some(("", name)) => ("/".to_string(), name.to_string()),
        Some((dir, name)) => (dir.to_string(), name.to_string()),
        None => (".".to_string(), trimmed.to_string()),
    }
}

/// `dir/name` for guest paths.
pub fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// The temporary name beside `path` a copy is written to before its rename.
pub fn temp_beside(path: &str) -> String {
    let (dir, name) = split(path);
    join(&dir, &format!(".{name}.agentvm-tmp"))
}

/// Whether a guest's error output says its disk (or file system) is full.
pub fn says_disk_full(text: &str) -> bool {
    text.contains("No space left on device") || text.contains("ENOSPC")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `sh` makes of `line`, one argument per line.
    fn words(line: &str) -> Vec<String> {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("for w in {line}; do printf '%s\\n' \"$w\"; done"))
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn quoting_keeps_every_word_whole() {
        let hard = [
            "plain",
            "/with space/x",
            "it's",
            "'",
            "''",
            "$HOME",
            "`id`",
            "a;b|c&d",
            "*",
            "back\\slash",
            "\"q\"",
            "-n",
            "",
            "tab\there",
            "ünïcode",
        ];
        for word in hard {
            let got = words(&quote(word));
            let want: Vec<String> = vec![word.to_string()];
            assert_eq!(got, want, "{word:?} quoted as {}", quote(word));
        }
        assert_eq!(quote("/a/b.txt"), "/a/b.txt");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
    }

    #[test]
    fn command_lines_run_the_script_with_the_arguments() {
        let line = command_line(r#"printf '%s|' "$@""#, &["a b", "it's", "$x"]);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&line)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), "a b|it's|$x|");
    }

    #[test]
    fn entries_are_parsed_from_stat_lines() {
        assert_eq!(
            parse_entry("81e8 750 20971520 /tmp/a file"),
            Some(Entry {
                kind: Kind::File,
                mode: 0o750,
                size: 20971520,
                path: "/tmp/a file".into()
            })
        );
        assert_eq!(parse_entry("41ed 755 4096").unwrap().kind, Kind::Dir);
        assert_eq!(parse_entry("a1ff 777 7 /l").unwrap().kind, Kind::Symlink);
        assert_eq!(parse_entry("missing"), None);
        assert_eq!(parse_entry(""), None);
    }

    #[test]
    fn paths_split_join_and_get_temporary_names() {
        assert_eq!(split("/a/b"), ("/a".into(), "b".into()));
        assert_eq!(split("/a/b/"), ("/a".into(), "b".into()));
        assert_eq!(split("/b"), ("/".into(), "b".into()));
        assert_eq!(split("b"), (".".into(), "b".into()));
        assert_eq!(join("/", "x"), "/x");
        assert_eq!(join("/a", "x"), "/a/x");
        assert_eq!(temp_beside("/srv/data.bin"), "/srv/.data.bin.agentvm-tmp");
    }

    #[test]
    fn the_scripts_work_in_a_posix_shell() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let run = |script: &str, args: &[&str], stdin: &[u8]| {
            use std::io::Write;
            let mut child = std::process::Command::new("sh")
                .arg("-c")
                .arg(command_line(script, args))
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(stdin).unwrap();
            let out = child.wait_with_output().unwrap();
            (out.status.success(), String::from_utf8(out.stdout).unwrap())
        };
        let target = format!("{d}/it's here");
        let tmp = temp_beside(&target);
        assert!(run(RECEIVE_FILE, &[&tmp, "750", &target], b"bytes").0);
        assert_eq!(std::fs::read(&target).unwrap(), b"bytes");
        assert!(!std::path::Path::new(&tmp).exists());
        let (ok, out) = run(PROBE, &[&target], b"");
        assert!(ok);
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some(target.as_str()));
        let entry = parse_entry(lines.next().unwrap()).unwrap();
        assert_eq!((entry.kind, entry.mode, entry.size), (Kind::File, 0o750, 5));
        let (_, out) = run(PROBE, &[&format!("{d}/nothing")], b"");
        assert_eq!(out.lines().nth(1), Some("missing"));
        // A folder under the final name is not written into.
        let folder = format!("{d}/folder");
        std::fs::create_dir(&folder).unwrap();
        assert!(!run(RECEIVE_FILE, &[&temp_beside(&folder), "600", &folder], b"x").0);
        assert_eq!(std::fs::read_dir(&folder).unwrap().count(), 0);
        assert!(!std::path::Path::new(&temp_beside(&folder)).exists());
        // A failed receive leaves neither the file nor its temporary name.
        let missing_dir = format!("{d}/no/such");
        assert!(
            !run(
                RECEIVE_FILE,
                &[&temp_beside(&missing_dir), "600", &missing_dir],
                b"x"
            )
            .0
        );
        assert!(!std::path::Path::new(&missing_dir).exists());
    }
}
