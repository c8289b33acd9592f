//! The text form of actions and schedules, for printing, hand-writing and editing.
//!
//! Actions: `S2F3` (forward of stage 2 on micro-batch 3), `S2B3` (backward), `S2I3` / `S2W3`
//! (input / weight halves of a split backward). A transfer is written as the compute action
//! whose output it moves, with an arrow on the side the data leaves or arrives:
//! `S2F3>` sends the activation S2F3 produced, `>S2F3` receives it; `S2B3>` sends the input
//! gradient S2B3 produced, `>S2B3` receives it.
//!
//! A schedule file has a header and one line per rank, in rank order; `#` starts a comment:
//!
//! ```text
//! schedule: 1f1b
//! microbatches: 2
//! placement: 0 1
//! rank 0: S0F0 S0F0> S0F1 S0F1> >S1B0 S0B0 >S1B1 S0B1
//! rank 1: >S0F0 S1F0 S1B0 S1B0> >S0F1 S1F1 S1B1 S1B1>
//! ```
//!
//! `placement` lists the rank of every stage; without it stage `k` goes to rank `k mod p`.
//! `microbatches` defaults to one more than the largest micro-batch named.

use std::fmt;
use std::str::FromStr;

use anyhow::Result;

use super::{Action, Schedule};
use crate::{invalid, invalid_input};

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (s, m) = (self.stage(), self.microbatch());
        match self {
            Action::Forward { .. } => write!(f, "S{s}F{m}"),
            Action::Backward { .. } => write!(f, "S{s}B{m}"),
            Action::BackwardInput { .. } => write!(f, "S{s}I{m}"),
            Action::BackwardWeight { .. } => write!(f, "S{s}W{m}"),
            Action::SendActivation { .. } => write!(f, "S{s}F{m}>"),
            Action::RecvActivation { .. } => write!(f, ">S{s}F{m}"),
            Action::SendGradient { .. } => write!(f, "S{s}B{m}>"),
            Action::RecvGradient { .. } => write!(f, ">S{s}B{m}"),
        }
    }
}

/// Stage, micro-batch and rank numbers of a schedule file stay below this (2²⁰): far beyond
/// any pipeline, and small enough that what is built from them (placements, the validator's
/// tables) stays small.
const MAX_INDEX: usize = 1 << 20;

const ACTION_FORMS: &str =
    "expected S<stage><F|B|I|W><microbatch>, or a transfer S<s>F<m>>, >S<s>F<m>, S<s>B<m>>, >S<s>B<m>";

impl FromStr for Action {
    type Err = anyhow::Error;

    fn from_str(token: &str) -> Result<Self> {
        let (recv, rest) = match token.strip_prefix('>') {
            Some(rest) => (true, rest),
            None => (false, token),
        };
        let (send, rest) = match rest.strip_suffix('>') {
            Some(rest) => (true, rest),
            None => (false, rest),
        };
        let Some(body) = rest.strip_prefix('S') else {
            invalid!("`{token}`: {ACTION_FORMS}");
        };
        let Some(kind_at) = body.find(|c: char| !c.is_ascii_digit()) else {
            invalid!("`{token}`: {ACTION_FORMS}");
        };
        let (stage, kind_and_mb) = body.split_at(kind_at);
        let mut chars = kind_and_mb.chars();
        let kind = chars.next().unwrap_or(' ');
        let microbatch = chars.as_str();
        let number = |text: &str| -> Result<usize> {
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                invalid!("`{token}`: {ACTION_FORMS}");
            }
            match text.parse::<usize>() {
                Ok(n) if n < MAX_INDEX => Ok(n),
                _ => invalid!(
                    "`{token}`: number `{text}` is too large (at most {})",
                    MAX_INDEX - 1
                ),
            }
        };
        let (stage, microbatch) = (number(stage)?, number(microbatch)?);
        let action = match (kind, recv, send) {
            ('F', false, false) => Action::Forward { stage, microbatch },
            ('B', false, false) => Action::Backward { stage, microbatch },
            ('I', false, false) => Action::BackwardInput { stage, microbatch },
            ('W', false, false) => Action::BackwardWeight { stage, microbatch },
            ('F', false, true) => Action::SendActivation { stage, microbatch },
            ('F', true, false) => Action::RecvActivation { stage, microbatch },
            ('B', false, true) => Action::SendGradient { stage, microbatch },
            ('B', true, false) => Action::RecvGradient { stage, microbatch },
            _ => invalid!("`{token}`: {ACTION_FORMS}"),
        };
        Ok(action)
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "schedule: {}", self.name)?;
        writeln!(f, "microbatches: {}", self.microbatches)?;
        write!(f, "placement:")?;
        for rank in &self.placement {
            write!(f, " {rank}")?;
        }
        writeln!(f)?;
        for (rank, actions) in self.ranks.iter().enumerate() {
            write!(f, "rank {rank}:")?;
            for action in actions {
                write!(f, " {action}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

impl FromStr for Schedule {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Self> {
        Schedule::parse(text)
    }
}

impl Schedule {
    /// Read a schedule from its text form (see the module docs); errors name line and token.
    ///
    /// Only the syntax is checked here; [`super::validate`] checks that the schedule runs.
    pub fn parse(text: &str) -> Result<Schedule> {
        let mut name = None;
        let mut microbatches = None;
        let mut placement: Option<Vec<usize>> = None;
        let mut ranks: Vec<Vec<Action>> = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line_no = index + 1;
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                invalid!(
                    "line {line_no}: expected `key: value` or `rank N: actions`, got `{line}`"
                );
            };
            let key = key.trim();
            let tokens = value.split_whitespace();
            if let Some(rank) = key.strip_prefix("rank") {
                let rank = rank.trim();
                if rank.parse::<usize>().ok() != Some(ranks.len()) {
                    invalid!(
                        "line {line_no}: expected `rank {}:` (ranks are listed in order from 0), got `{key}:`",
                        ranks.len()
                    );
                }
                let mut actions = Vec::new();
                for (t, token) in tokens.enumerate() {
                    let action = token
                        .parse::<Action>()
                        .map_err(|err| invalid_input!("line {line_no}, token {}: {err}", t + 1))?;
                    actions.push(action);
                }
                ranks.push(actions);
                continue;
            }
            match key {
                "schedule" => name = Some(value.trim().to_string()),
                "microbatches" => {
                    let value = value.trim();
                    match value.parse::<usize>() {
                        Ok(m) if m > 0 && m <= MAX_INDEX => microbatches = Some(m),
                        _ => invalid!(
                            "line {line_no}, token 1: microbatches must be a whole number from 1 to {MAX_INDEX}, got `{value}`"
                        ),
                    }
                }
                "placement" => {
                    let mut list = Vec::new();
                    for (t, token) in tokens.enumerate() {
                        match token.parse::<usize>() {
                            Ok(rank) if rank < MAX_INDEX => list.push(rank),
                            _ => invalid!(
                                "line {line_no}, token {}: a placement entry is a rank number, got `{token}`",
                                t + 1
                            ),
                        }
                    }
                    if list.is_empty() {
                        invalid!("line {line_no}: placement lists no stages");
                    }
                    placement = Some(list);
                }
                other => invalid!(
                    "line {line_no}: unknown key `{other}` (expected schedule, microbatches, placement or rank N)"
                ),
            }
        }
        if ranks.is_empty() {
            invalid!("the schedule has no `rank 0:` line");
        }
        let all = ranks.iter().flatten();
        let max_stage = all.clone().map(Action::stage).max();
        let max_mb = all.map(Action::microbatch).max();
        // What checking and simulating it builds grows with stages × micro-batches: bounded
        // as a generated plan is.
        let stages = placement.as_ref().map_or(
            max_stage.map_or(ranks.len(), |s| (s + 1).max(ranks.len())),
            Vec::len,
        );
        let microbatches = microbatches.unwrap_or_else(|| max_mb.map_or(1, |m| m + 1));
        let cells = stages.saturating_mul(microbatches).saturating_mul(3);
        if cells > super::generate::max_actions() {
            invalid!(
                "a schedule of {stages} stages and {microbatches} micro-batches makes up to {cells} actions, beyond the limit of {} (--max-actions raises it)",
                super::generate::max_actions()
            );
        }
        let placement = match placement {
            Some(list) => list,
            None => super::looped_placement(stages, ranks.len()),
        };
        Ok(Schedule {
            name: name.unwrap_or_else(|| "file".to_string()),
            microbatches,
            placement,
            ranks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_beyond_any_pipeline_are_refused_before_anything_is_built() {
        // Found by the schedule_file fuzz target: stage 17777777777777777777 made the
        // implied placement that long.
        let text = "rank 0: S0F0 >S17777777777777777777B1\nrank 1: >S0F0\n";
        let err = Schedule::parse(text).unwrap_err().to_string();
        assert!(err.contains("too large (at most 1048575)"), "{err}");
        let err = Schedule::parse("microbatches: 99999999999\nrank 0: S0F0\n").unwrap_err();
        assert!(err.to_string().contains("from 1 to 1048576"), "{err}");
        // Found by the same target: 10⁶ stages of 500 micro-batches ran the checker out of
        // memory; such a file is held to the plan size limit.
        let err = Schedule::parse("schedule:0\nrank 0:S999999F499\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("1000000 stages and 500 micro-batches"),
            "{err}"
        );
    }

    #[test]
    fn actions_round_trip() {
        for token in [
            "S2F3", "S1B0", "S1I0", "S1W0", "S2F3>", ">S2F3", "S4B7>", ">S4B7",
        ] {
            let action: Action = token.parse().unwrap();
            assert_eq!(action.to_string(), token);
        }
        assert_eq!(
            "S12F345".parse::<Action>().unwrap(),
            Action::Forward {
                stage: 12,
                microbatch: 345
            }
        );
    }

    #[test]
    fn bad_actions_are_rejected() {
        for token in [
            "", "S", "F3", "S2X3", "S2F", "SF3", ">S2F3>", "S2I3>", ">S2W3", "S2F3x",
        ] {
            assert!(token.parse::<Action>().is_err(), "{token}");
        }
    }

    #[test]
    fn schedule_round_trips() {
        let text = "schedule: test\nmicrobatches: 2\nplacement: 0 1\nrank 0: S0F0 S0F0> >S1B0 S0B0\nrank 1: >S0F0 S1F0 S1B0 S1B0>\n";
        let schedule: Schedule = text.parse().unwrap();
        assert_eq!(schedule.to_string(), text);
        assert_eq!(schedule.num_stages(), 2);
    }

    #[test]
    fn header_defaults_come_from_the_actions() {
        let schedule =
            Schedule::parse("# hand-written\nrank 0: S0F0 S0F1 S0B0 S0B1\nrank 1:\n").unwrap();
        assert_eq!(schedule.microbatches, 2);
        assert_eq!(schedule.placement, vec![0, 1]);
        assert_eq!(schedule.name, "file");
    }

    #[test]
    fn parse_errors_name_line_and_token() {
        let err = Schedule::parse("microbatches: 2\nrank 0: S0F0 S0Q1\n").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("line 2, token 2") && msg.contains("S0Q1"),
            "{msg}"
        );
        let err = Schedule::parse("rank 1: S0F0\n").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        assert!(crate::is_invalid_input(&err));
    }
}
