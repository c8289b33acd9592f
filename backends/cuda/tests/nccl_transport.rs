//! The NCCL transport on a GPU: a one-rank communicator sending to itself (what one GPU
//! allows) moves tensors exactly, in order, ordered against compute on both sides, and frees
//! what it staged; a communicator whose other rank never joins gives up after the timeout, or
//! at once when the run reports a failure. Skipped, with the reason on stderr, where CUDA or
//! NCCL is not usable (a failure instead with `PIPIT_REQUIRE_CUDA` set, as on GPU machines).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pipit_cuda::{nccl_probe, probe, CudaBackend, NcclSetup, NcclTransport};
use pipit_engine::dist::{PeerProbe, TensorSetup};
use pipit_engine::Backend;

const TIMEOUT: Duration = Duration::from_secs(30);

/// A CUDA backend on device 0 when CUDA and NCCL are usable; otherwise `None` after printing
/// why (or failing, with `PIPIT_REQUIRE_CUDA` set).
fn gpu() -> Option<CudaBackend> {
    if let Err(why) = probe().and_then(|_| nccl_probe()) {
        assert!(
            std::env::var_os("PIPIT_REQUIRE_CUDA").is_none(),
            "PIPIT_REQUIRE_CUDA is set, but CUDA with NCCL is not usable: {why}"
        );
        eprintln!("skipped: CUDA with NCCL is not usable here: {why}");
        return None;
    }
    Some(CudaBackend::new(0).expect("CUDA is usable, so its backend opens"))
}

fn no_failures() -> PeerProbe {
    Arc::new(|| None)
}

#[test]
fn a_one_rank_communicator_sends_to_itself_exactly() {
    let Some(backend) = gpu() else { return };
    let blob = NcclSetup.prepare(true).unwrap();
    assert_eq!(blob.len(), 128, "NCCL's unique id");
    let mut t = NcclSetup
        .open(&backend, 0, 1, &blob, TIMEOUT, no_failures())
        .unwrap();

    let xs: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 3.0).collect();
    let ys: Vec<f32> = (0..37).map(|i| (i as f32).sin()).collect();
    let mut x = backend.upload(&xs).unwrap();
    let y = backend.upload(&ys).unwrap();
    let before = backend.memory().in_use;
    t.send(&backend, 0, &x).unwrap();
    t.send(&backend, 0, &y).unwrap();
    // Overwritten by compute right after the send: the message holds what was sent.
    backend.fill(&mut x, 9.0).unwrap();
    let mut got_x = t.recv(&backend, 0, xs.len()).unwrap();
    let got_y = t.recv(&backend, 0, ys.len()).unwrap();
    assert_eq!(
        backend.download(&got_y).unwrap(),
        ys,
        "messages arrive in order"
    );
    // Compute on the received buffer waits for its transfer.
    let ones = backend.upload(&vec![1.0; xs.len()]).unwrap();
    backend.add_assign(&mut got_x, &ones).unwrap();
    let want: Vec<f32> = xs.iter().map(|v| v + 1.0).collect();
    assert_eq!(backend.download(&got_x).unwrap(), want);
    assert_eq!(backend.download(&x).unwrap(), vec![9.0; xs.len()]);

    // A receiver that expects another length is told so, not handed a cut tensor.
    let short = backend.upload(&[1.0; 10]).unwrap();
    t.send(&backend, 0, &short).unwrap();
    let err = t.recv(&backend, 0, 11).unwrap_err().to_string();
    assert!(
        err.contains("expected a tensor of 11 values from rank 0 and received 10"),
        "{err}"
    );
    let err = t.recv(&backend, 0, 4).unwrap_err().to_string();
    assert!(err.contains("sent itself nothing"), "{err}");

    // A larger tensor, with a figure for the record (no assertion on time).
    let n = 1 << 24;
    let big: Vec<f32> = (0..n).map(|i| (i % 4099) as f32).collect();
    let b = backend.upload(&big).unwrap();
    backend.synchronize().unwrap();
    let start = Instant::now();
    t.send(&backend, 0, &b).unwrap();
    let got = t.recv(&backend, 0, n).unwrap();
    backend.synchronize().unwrap();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "NCCL send to self of {} MiB: {:.3} ms ({:.1} GB/s, staging copy included)",
        (n * 4) >> 20,
        secs * 1e3,
        (n * 4) as f64 / secs / 1e9
    );
    assert!(backend.download(&got).unwrap() == big);
    drop((got, got_x, got_y, short, b, ones));

    t.flush().unwrap();
    assert_eq!(
        backend.memory().in_use,
        before,
        "staged copies and received buffers are freed"
    );
}

#[test]
fn a_communicator_whose_other_rank_never_joins_gives_up() {
    let Some(backend) = gpu() else { return };
    // Rank 1 of 2 never comes: the setup ends after the timeout, naming what was missing.
    let blob = NcclSetup.prepare(true).unwrap();
    let t = Duration::from_secs(3);
    let err = NcclTransport::open(&backend, 0, 2, &blob, t, no_failures())
        .err()
        .expect("a communicator short of a rank never completes");
    assert!(
        err.to_string()
            .contains("the NCCL communicator of 2 ranks was not complete after 3 s"),
        "{err:#}"
    );

    // A failure reported by the run ends the wait at once, with that failure first.
    let failed = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&failed);
    let peers: PeerProbe = Arc::new(move || {
        flag.load(Ordering::SeqCst)
            .then(|| "rank 1 stopped without finishing".to_string())
    });
    failed.store(true, Ordering::SeqCst);
    let blob = NcclSetup.prepare(true).unwrap();
    let err = NcclTransport::open(&backend, 0, 2, &blob, TIMEOUT, peers)
        .err()
        .expect("a failed run never completes the communicator");
    assert_eq!(
        err.to_string(),
        "rank 1 stopped without finishing; rank 0 stopped while setting up NCCL"
    );
}

#[test]
fn ranks_and_ids_are_checked_before_nccl_is_asked() {
    let Some(backend) = gpu() else { return };
    let err = NcclTransport::open(&backend, 2, 2, &[0; 128], TIMEOUT, no_failures())
        .err()
        .unwrap();
    assert_eq!(err.to_string(), "rank 2 is not below the world size 2");
    let err = NcclTransport::open(&backend, 0, 1, &[0; 8], TIMEOUT, no_failures())
        .err()
        .unwrap();
    assert!(err.to_string().contains("8 bytes, not 128"), "{err}");
}
