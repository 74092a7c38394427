//! The README's configuration table and the command-line definitions must agree: every
#![allow(clippy::unwrap_used, clippy::expect_used)]
//! flag, every environment variable (aliases included) and every default.

use std::collections::BTreeMap;

use tap::config::settings::{IGNORED, Kind, SETTINGS};

#[derive(Debug, PartialEq, Eq)]
struct Row {
    envs: Vec<String>,
    default: String,
    /// What the meaning column says about the setting's effect.
    note: Note,
}

/// The two facts the meaning column must state when they hold, and only then.
#[derive(Debug, PartialEq, Eq)]
struct Note {
    extension: bool,
    ignored: bool,
}

fn backticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

fn readme_rows() -> BTreeMap<String, Row> {
    let readme = include_str!("../../../README.md");
    let start = readme
        .find("<!-- config-table:start -->")
        .expect("README has the config table start marker");
    let end = readme
        .find("<!-- config-table:end -->")
        .expect("README has the config table end marker");
    readme[start..end]
        .lines()
        .filter(|l| l.starts_with("| `--"))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let flag = backticked(cells[1])[0].trim_start_matches("--").to_owned();
            let default = if cells[3] == "(unset)" {
                String::new()
            } else {
                backticked(cells[3]).concat()
            };
            (
                flag,
                Row {
                    envs: backticked(cells[2]),
                    default,
                    note: Note {
                        extension: cells[4].contains("(extension)"),
                        ignored: cells[4].contains(IGNORED),
                    },
                },
            )
        })
        .collect()
}

#[test]
fn readme_config_table_matches_the_cli_definitions() {
    let documented = readme_rows();
    let defined: BTreeMap<String, Row> = SETTINGS
        .iter()
        .map(|s| {
            (
                s.flag.to_owned(),
                Row {
                    envs: s.envs.iter().map(|e| (*e).to_owned()).collect(),
                    default: s.default.to_owned(),
                    note: Note {
                        extension: s.extension,
                        ignored: s.ignored,
                    },
                },
            )
        })
        .collect();
    let missing: Vec<_> = defined
        .keys()
        .filter(|k| !documented.contains_key(*k))
        .collect();
    let extra: Vec<_> = documented
        .keys()
        .filter(|k| !defined.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "flags missing from the README: {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "README documents unknown flags: {extra:?}"
    );
    for (flag, row) in &defined {
        assert_eq!(&documented[flag], row, "README row for --{flag} drifted");
    }
}

/// A setting parsed but without effect must say so in `--help` and the README, so a flag
/// whose meaning was dropped cannot keep being documented as working.
#[test]
fn settings_without_effect_say_so_in_their_help() {
    for s in SETTINGS {
        assert_eq!(s.help.starts_with(IGNORED), s.ignored, "--{}", s.flag);
        assert!(!(s.ignored && s.extension), "--{}", s.flag);
    }
}

#[test]
fn every_boolean_setting_defaults_to_false_and_every_env_is_tap_prefixed_or_a_known_alias() {
    for s in SETTINGS {
        if s.kind == Kind::Bool {
            assert_eq!(s.default, "false", "--{}", s.flag);
        }
        assert!(
            s.envs[0].starts_with("TAP_"),
            "--{} documents {}",
            s.flag,
            s.envs[0]
        );
        for alias in &s.envs[1..] {
            assert!(
                [
                    "ATP_PLC_HOST",
                    "RELAY_IDENT_CACHE_SIZE",
                    "LOG_LEVEL",
                    "TAP_SIGNAL_COLLECTIONS"
                ]
                .contains(alias),
                "unexpected alias {alias}"
            );
        }
    }
}
