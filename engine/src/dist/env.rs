//! A process's place in a multi-process run, read from the variables launchers set:
//! torchrun's (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) or srun's
//! (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, with the master host taken from
//! `MASTER_ADDR` or else the first host of `SLURM_JOB_NODELIST`).

use anyhow::Result;

use crate::invalid_input;

/// Rendezvous port when the launcher names none (torchrun's default).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Where this process sits in the run and how to reach rank 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchEnv {
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    /// Number of processes (pipeline ranks) in the run.
    pub world_size: usize,
    /// Index of this process among those on its host (picks its device).
    pub local_rank: usize,
    /// Host of rank 0's rendezvous store.
    pub master_addr: String,
    /// Port of rank 0's rendezvous store.
    pub master_port: u16,
    /// Shared secret every rank presents at the rendezvous (`PIPIT_TOKEN`); required when
    /// the store listens beyond loopback.
    pub token: Option<String>,
    /// Which launcher's variables were found: `torchrun` or `srun`.
    pub launcher: &'static str,
    /// Under torchrun's elastic agent (`TORCHELASTIC_USE_AGENT_STORE` set), the agent already
    /// serves a TCPStore on MASTER_ADDR:MASTER_PORT: the ranks meet in it, under this key
    /// prefix (the run id and restart count torchrun gives), instead of rank 0 serving
    /// pipit's own store there.
    pub agent_store: Option<String>,
}

impl LaunchEnv {
    /// Read the process environment; `None` when no launcher variables are set.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Read the variables through `get` (the environment, or a map in tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let number = |name: &str| -> Result<Option<usize>> {
            match get(name) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| {
                    invalid_input!("{name} must be a non-negative integer, got {v:?}")
                }),
            }
        };
        let (rank, world_size, local_rank, launcher) =
            match (number("RANK")?, number("WORLD_SIZE")?) {
                (Some(rank), Some(world)) => (rank, world, number("LOCAL_RANK")?, "torchrun"),
                (Some(_), None) | (None, Some(_)) => {
                    return Err(invalid_input!("RANK and WORLD_SIZE must be set together"))
                }
                (None, None) => match (number("SLURM_PROCID")?, number("SLURM_NTASKS")?) {
                    (Some(rank), Some(world)) => (rank, world, number("SLURM_LOCALID")?, "srun"),
                    _ => return Ok(None),
                },
            };
        if world_size == 0 || rank >= world_size {
            return Err(invalid_input!(
                "the rank must be below the world size: rank {rank}, world size {world_size} ({launcher} variables)"
            ));
        }
        let master_addr = match get("MASTER_ADDR").filter(|a| !a.trim().is_empty()) {
            Some(addr) => addr.trim().to_string(),
            None => get("SLURM_JOB_NODELIST")
                .or_else(|| get("SLURM_NODELIST"))
                .and_then(|list| first_host(&list))
                .unwrap_or_else(|| "127.0.0.1".to_string()),
        };
        let master_port = match get("MASTER_PORT") {
            None => DEFAULT_MASTER_PORT,
            Some(p) => p.trim().parse().map_err(|_| {
                invalid_input!("MASTER_PORT must be a port number (1-65535), got {p:?}")
            })?,
        };
        Ok(Some(Self {
            rank,
            world_size,
            local_rank: local_rank.unwrap_or(rank),
            master_addr,
            master_port,
            token: get("PIPIT_TOKEN").filter(|t| !t.is_empty()),
            launcher,
            agent_store: get("TORCHELASTIC_USE_AGENT_STORE")
                .filter(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1"))
                .map(|_| {
                    let run = get("TORCHELASTIC_RUN_ID").unwrap_or_else(|| "none".into());
                    let restart = get("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|| "0".into());
                    format!("pipit/{}/{}", run.trim(), restart.trim())
                }),
        }))
    }
}

/// The first host of a Slurm node list: `node[03-05,9],gpu1` gives `node03`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let first_end = {
        let mut depth = 0usize;
        list.char_indices()
            .find(|&(_, c)| {
                match c {
                    '[' => depth += 1,
                    ']' => depth = depth.saturating_sub(1),
                    _ => {}
                }
                c == ',' && depth == 0
            })
            .map_or(list.len(), |(i, _)| i)
    };
    let entry = &list[..first_end];
    let host = match entry.split_once('[') {
        None => entry.to_string(),
        Some((prefix, ranges)) => {
            let first: String = ranges.chars().take_while(|c| c.is_ascii_digit()).collect();
            format!("{prefix}{first}")
        }
    };
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(vars: &[(&str, &str)]) -> Result<Option<LaunchEnv>> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        LaunchEnv::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn torchrun_variables() {
        let env = read(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.2"),
            ("MASTER_PORT", "4321"),
            ("PIPIT_TOKEN", "s3cret"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((env.rank, env.world_size, env.local_rank), (3, 4, 1));
        assert_eq!(
            (env.master_addr.as_str(), env.master_port),
            ("10.0.0.2", 4321)
        );
        assert_eq!(env.token.as_deref(), Some("s3cret"));
        assert_eq!(env.launcher, "torchrun");
    }

    #[test]
    fn srun_variables_with_the_master_from_the_node_list() {
        let env = read(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[07-08,12],login1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((env.rank, env.world_size, env.local_rank), (5, 8, 1));
        assert_eq!(env.master_addr, "gpu07");
        assert_eq!(env.master_port, DEFAULT_MASTER_PORT);
        assert_eq!(env.launcher, "srun");
        assert_eq!(env.token, None);
    }

    #[test]
    fn torchrun_variables_win_over_slurm_ones() {
        let env = read(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((env.rank, env.world_size, env.local_rank), (1, 2, 1));
        assert_eq!(env.master_addr, "127.0.0.1");
    }

    #[test]
    fn torchruns_agent_store_is_joined_under_its_run_and_restart() {
        let env = read(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RUN_ID", "abc"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(env.agent_store.as_deref(), Some("pipit/abc/2"));
        let plain = read(&[("RANK", "1"), ("WORLD_SIZE", "2")])
            .unwrap()
            .unwrap();
        assert_eq!(plain.agent_store, None);
    }

    #[test]
    fn no_variables_means_a_single_process() {
        assert_eq!(read(&[]).unwrap(), None);
        assert_eq!(read(&[("SLURM_PROCID", "0")]).unwrap(), None);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let err = |vars: &[(&str, &str)]| read(vars).unwrap_err().to_string();
        assert!(err(&[("RANK", "x"), ("WORLD_SIZE", "2")]).contains("RANK"));
        assert!(err(&[("RANK", "2"), ("WORLD_SIZE", "2")]).contains("rank 2, world size 2"));
        assert!(err(&[("RANK", "0")]).contains("together"));
        assert!(
            err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "99999")])
                .contains("MASTER_PORT")
        );
        assert!(crate::is_invalid_input(
            &read(&[("RANK", "-1"), ("WORLD_SIZE", "2")]).unwrap_err()
        ));
    }

    #[test]
    fn slurm_node_lists() {
        assert_eq!(first_host("node1").as_deref(), Some("node1"));
        assert_eq!(first_host("a[003-010],b").as_deref(), Some("a003"));
        assert_eq!(first_host("x,y").as_deref(), Some("x"));
        assert_eq!(first_host("c[2,4]").as_deref(), Some("c2"));
        assert_eq!(first_host(""), None);
    }
}
