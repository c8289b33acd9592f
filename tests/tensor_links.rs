//! Ranks whose tensors travel over a transport of their own (as NCCL carries them between CUDA
//! ranks) while control messages stay on TCP, checked on the CPU: the ranks are threads of one
//! process meeting at a loopback rendezvous, and an in-process transport stands in for NCCL.
//! The run gives the single-process losses, every rank opens its transport from the bytes
//! rank 0 published at the rendezvous, every tensor of a step travels over that transport, and
//! a rank that would move tensors differently from rank 0 is refused.

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, Result};
use pipit::engine::data::Corpus;
use pipit::engine::dist::{LaunchEnv, PeerProbe, RankTrainer, TensorSetup, TensorTransport};
use pipit::engine::exec::{in_process_mesh, InProcessTransport};
use pipit::engine::model::ModelConfig;
use pipit::engine::train::{Init, TrainConfig, Trainer};
use pipit::engine::Transport;
use pipit::reference::{RefBuffer, ReferenceBackend};

const TIMEOUT: Duration = Duration::from_secs(20);
const STEPS: usize = 3;
/// What rank 0 publishes at the rendezvous.
const KEY: &[u8] = b"rank 0's key";

/// An in-process transport standing in for NCCL, counting the tensors sent over it.
struct Counted {
    inner: InProcessTransport,
    sent: Arc<AtomicUsize>,
}

impl Transport<ReferenceBackend> for Counted {
    fn send(&mut self, backend: &ReferenceBackend, to: usize, buf: &RefBuffer) -> Result<()> {
        self.sent.fetch_add(1, Ordering::SeqCst);
        self.inner.send(backend, to, buf)
    }

    fn recv(&mut self, backend: &ReferenceBackend, from: usize, len: usize) -> Result<RefBuffer> {
        self.inner.recv(backend, from, len)
    }
}

impl TensorTransport<ReferenceBackend> for Counted {
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    fn abort(&mut self) {}
}

/// One rank's setup: its end of the in-process mesh, and what it was given to open it.
struct Setup {
    end: Mutex<Option<InProcessTransport>>,
    opened_with: Mutex<Option<Vec<u8>>>,
    sent: Arc<AtomicUsize>,
}

impl TensorSetup<ReferenceBackend> for Setup {
    fn name(&self) -> &'static str {
        "in-process"
    }

    fn prepare(&self, leader: bool) -> Result<Vec<u8>> {
        Ok(if leader { KEY.to_vec() } else { Vec::new() })
    }

    fn open(
        &self,
        _backend: &ReferenceBackend,
        _rank: usize,
        _world: usize,
        blob: &[u8],
        _timeout: Duration,
        _peers: PeerProbe,
    ) -> Result<Box<dyn TensorTransport<ReferenceBackend>>> {
        *self.opened_with.lock().unwrap() = Some(blob.to_vec());
        let inner = self
            .end
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| anyhow!("opened twice"))?;
        Ok(Box::new(Counted {
            inner,
            sent: Arc::clone(&self.sent),
        }))
    }
}

fn config() -> TrainConfig {
    TrainConfig {
        model: ModelConfig {
            n_layer: 2,
            n_embd: 16,
            n_head: 2,
            n_positions: 16,
            ..ModelConfig::default()
        },
        stages: 2,
        microbatches: 2,
        batch_size: 4,
        seq_len: 16,
        ..TrainConfig::default()
    }
}

fn corpus() -> Corpus {
    let text = "Now is the winter of our discontent made glorious summer by this sun of York. ";
    Corpus::split(text.repeat(200).as_bytes(), 0.1).unwrap()
}

fn env(rank: usize, port: u16) -> LaunchEnv {
    LaunchEnv {
        rank,
        world_size: 2,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        token: None,
        launcher: "torchrun",
        agent_store: None,
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn ranks_with_a_tensor_transport_of_their_own_train_like_one_process() {
    let corpus = corpus();
    let mut single = Trainer::new(config(), |_| Ok(ReferenceBackend::new()), Init::Fresh).unwrap();
    let want: Vec<f32> = (0..STEPS)
        .map(|_| single.train_step(&corpus).unwrap().loss)
        .collect();
    let want_val = single.evaluate(&corpus.val, 16, 256).unwrap();

    let port = free_port();
    let sent = Arc::new(AtomicUsize::new(0));
    let setups: Vec<Setup> = in_process_mesh(2, TIMEOUT)
        .into_iter()
        .map(|end| Setup {
            end: Mutex::new(Some(end)),
            opened_with: Mutex::new(None),
            sent: Arc::clone(&sent),
        })
        .collect();
    let ranks: Vec<_> = thread::scope(|s| {
        let handles: Vec<_> = setups
            .iter()
            .enumerate()
            .map(|(rank, setup)| {
                let corpus = &corpus;
                s.spawn(move || {
                    let mut t = RankTrainer::with_tensor_transport(
                        config(),
                        ReferenceBackend::new(),
                        Init::Fresh,
                        &env(rank, port),
                        TIMEOUT,
                        setup,
                    )
                    .unwrap();
                    let losses: Vec<f32> = (0..STEPS)
                        .map(|_| t.train_step(corpus).unwrap().loss)
                        .collect();
                    let val = t.evaluate(&corpus.val, 16, 256).unwrap();
                    let line = pipit::engine::train::TrainLoop::describe(&t).remove(0);
                    pipit::engine::train::TrainLoop::finish(&mut t).unwrap();
                    (losses, val, line)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (rank, (losses, val, line)) in ranks.iter().enumerate() {
        assert_eq!(losses, &want, "rank {rank}: the single-process losses");
        assert_eq!(val, &want_val, "rank {rank}: the single-process validation");
        assert!(line.ends_with("| tensors over in-process"), "{line}");
    }
    for (rank, setup) in setups.iter().enumerate() {
        assert_eq!(
            setup.opened_with.lock().unwrap().as_deref(),
            Some(KEY),
            "rank {rank} opened its transport with what rank 0 published"
        );
    }
    // Per step: two activations and two gradients (1F1B, two micro-batches), and the tied
    // embedding's gradient there and back; then evaluation's activations, one per batch of
    // 4 windows of 16 tokens out of 256, and the last stage's word that it has done them.
    assert_eq!(sent.load(Ordering::SeqCst), STEPS * 6 + 256 / 16 / 4 + 1);
}

#[test]
fn a_rank_that_would_move_tensors_differently_is_refused() {
    let port = free_port();
    let setup = Setup {
        end: Mutex::new(in_process_mesh(2, TIMEOUT).into_iter().nth(1)),
        opened_with: Mutex::new(None),
        sent: Arc::new(AtomicUsize::new(0)),
    };
    let (leader, other) = thread::scope(|s| {
        let leader = s.spawn(|| {
            RankTrainer::new(
                config(),
                ReferenceBackend::new(),
                Init::Fresh,
                &env(0, port),
                TIMEOUT,
            )
            .err()
        });
        let other = s.spawn(|| {
            RankTrainer::with_tensor_transport(
                config(),
                ReferenceBackend::new(),
                Init::Fresh,
                &env(1, port),
                TIMEOUT,
                &setup,
            )
            .err()
        });
        (leader.join().unwrap(), other.join().unwrap())
    });
    let err = format!("{:#}", other.expect("rank 1 is refused"));
    assert!(
        err.contains(r#"tensors: "in-process" here, null on rank 0"#),
        "{err}"
    );
    assert!(
        setup.opened_with.lock().unwrap().is_none(),
        "nothing was opened"
    );
    // Rank 0 built its stages before hearing why; it learns at its first wait on rank 1.
    assert!(leader.is_none(), "rank 0 itself was fine");
}
