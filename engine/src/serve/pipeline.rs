//! The pipeline's ranks on worker threads for as long as a server runs, each running the
//! ragged passes it is handed, in the order they were handed: a batch queue (vLLM's), so
//! that with `p` batches in flight rank `r + 1` works on one while rank `r` works on the
//! next.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, Result};

use crate::backend::{Backend, Transport};
use crate::exec::{forward_rank, InProcessTransport, Pass, Piece, Rank, SequenceCaches};

/// One ragged pass through every stage, and the sequences whose caches go first.
#[derive(Debug, Default)]
pub struct Job {
    /// Which batch in flight this is (handed back with its logits).
    pub group: usize,
    /// The sequences and their new tokens; none for a job that only frees caches.
    pub pieces: Vec<Piece>,
    /// Sequences that are done: every rank drops their caches before the pass.
    pub free: Vec<u64>,
}

/// The ranks of an in-process pipeline on their own threads.
pub struct Pipeline {
    senders: Vec<mpsc::Sender<Arc<Job>>>,
    results: mpsc::Receiver<Result<(usize, Vec<f32>)>>,
    workers: Vec<JoinHandle<()>>,
    in_flight: usize,
}

impl Pipeline {
    /// Start one worker per rank of `ranks`, whose stages `placement` places.
    pub fn start<B: Backend>(
        placement: Vec<usize>,
        ranks: Vec<Rank<B, InProcessTransport>>,
    ) -> Self {
        let placement = Arc::new(placement);
        let (done, results) = mpsc::channel();
        let mut senders = Vec::new();
        let mut workers = Vec::new();
        for mut rank in ranks {
            let (send, jobs) = mpsc::channel::<Arc<Job>>();
            senders.push(send);
            let placement = Arc::clone(&placement);
            let done = done.clone();
            let worker = std::thread::Builder::new()
                .name(format!("pipit-rank-{}", rank.rank))
                .spawn(move || {
                    let mut caches = SequenceCaches::default();
                    for job in jobs {
                        for &id in &job.free {
                            caches.free(id);
                        }
                        if job.pieces.is_empty() {
                            continue;
                        }
                        let tokens: Vec<u32> =
                            job.pieces.iter().flat_map(|p| &p.tokens).copied().collect();
                        let pass = Pass::Ragged {
                            pieces: &job.pieces,
                            caches: &mut caches,
                        };
                        let r = rank.rank;
                        match forward_rank(&placement, &mut rank, &tokens, pass) {
                            Ok(Some(logits)) => {
                                let _ = done.send(Ok((job.group, logits)));
                            }
                            Ok(None) => {}
                            Err(e) => {
                                // The other ranks waiting on this one fail at once too.
                                Transport::<B>::stop(&mut rank.transport);
                                let _ = done.send(Err(e.context(format!("rank {r}"))));
                                return;
                            }
                        }
                    }
                })
                .expect("a rank's thread starts");
            workers.push(worker);
        }
        Self {
            senders,
            results,
            workers,
            in_flight: 0,
        }
    }

    /// Hand `job` to every rank.
    pub fn submit(&mut self, job: Job) -> Result<()> {
        let runs = !job.pieces.is_empty();
        let job = Arc::new(job);
        for send in &self.senders {
            send.send(Arc::clone(&job))
                .map_err(|_| anyhow!("a rank of the pipeline has stopped"))?;
        }
        self.in_flight += usize::from(runs);
        Ok(())
    }

    /// Jobs handed out whose logits have not come back.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Wait for the next job to come through the last stage: its group and each of its
    /// sequences' next-token logits, one row after another.
    pub fn next(&mut self) -> Result<(usize, Vec<f32>)> {
        if self.in_flight == 0 {
            return Err(anyhow!("no pass of the pipeline is in flight"));
        }
        let result = self
            .results
            .recv()
            .map_err(|_| anyhow!("every rank of the pipeline has stopped"))?;
        self.in_flight -= 1;
        result
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.senders.clear();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}
