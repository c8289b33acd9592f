//! The collectives every transport shares (`exec::collective`), over the in-process mesh: an
//! all-reduce leaves the same sum, in the group's fixed order, on every member and touches
//! nobody else; a broadcast hands the root's values to all; a rank outside the group is an
//! error, not a hang.

use std::thread;
use std::time::Duration;

use pipit_engine::exec::collective::Group;
use pipit_engine::exec::in_process_mesh;
use pipit_engine::Backend;
use pipit_reference::ReferenceBackend;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Run `f(rank, transport)` on `world` threads, one rank each; the results by rank.
fn on_ranks<R: Send>(
    world: usize,
    f: impl Fn(usize, &mut pipit_engine::exec::InProcessTransport) -> R + Sync,
) -> Vec<R> {
    let f = &f;
    thread::scope(|s| {
        let handles: Vec<_> = in_process_mesh(world, TIMEOUT)
            .into_iter()
            .enumerate()
            .map(|(rank, mut t)| s.spawn(move || f(rank, &mut t)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn all_reduce_sums_on_every_member_in_the_groups_order() {
    let b = ReferenceBackend::new();
    let results = on_ranks(4, |rank, t| {
        let start = [
            rank as f32 + 1.0,
            10.0 * (rank as f32 + 1.0),
            0.1 * rank as f32,
        ];
        let mut buf = b.upload(&start).unwrap();
        // Ranks 3, 0 and 1 (root 3); rank 2 stays out.
        if rank != 2 {
            let mut group = Group::new(&[3, 0, 1], rank, &b, t).unwrap();
            group.all_reduce_sum(&mut buf).unwrap();
        }
        b.download(&buf).unwrap()
    });
    // The root's own value first, then the others in member order, in f32.
    let third = (0.1f32 * 3.0 + 0.0) + 0.1 * 1.0;
    let want = vec![4.0 + 1.0 + 2.0, 40.0 + 10.0 + 20.0, third];
    for rank in [0, 1, 3] {
        assert_eq!(results[rank], want, "rank {rank}");
    }
    assert_eq!(
        results[2],
        vec![3.0, 30.0, 0.1 * 2.0],
        "rank 2 is untouched"
    );
}

#[test]
fn scalar_sums_in_f64_at_the_root_and_agree_to_the_bit() {
    let b = ReferenceBackend::new();
    let values = [0.1f32, 0.2, 0.3, 1e-8];
    let results = on_ranks(4, |rank, t| {
        let everyone = [0, 1, 2, 3];
        let mut group = Group::new(&everyone, rank, &b, t).unwrap();
        group.all_reduce_sum_scalar(values[rank]).unwrap()
    });
    let want = values.iter().map(|&v| f64::from(v)).sum::<f64>() as f32;
    assert!(
        results.iter().all(|r| r.to_bits() == want.to_bits()),
        "{results:?}"
    );
}

#[test]
fn broadcast_hands_the_roots_values_to_all_and_outsiders_are_refused() {
    let b = ReferenceBackend::new();
    let results = on_ranks(3, |rank, t| {
        let mut buf = b.upload(&[rank as f32; 2]).unwrap();
        let mut group = Group::new(&[1, 0, 2], rank, &b, t).unwrap();
        group.broadcast(&mut buf).unwrap();
        b.download(&buf).unwrap()
    });
    assert!(results.iter().all(|r| r == &[1.0, 1.0]), "{results:?}");
    let mut t = in_process_mesh(2, TIMEOUT).remove(0);
    let err = Group::new(&[1], 0, &b, &mut t).err().expect("refused");
    assert!(
        err.to_string().contains("rank 0 is not in the group [1]"),
        "{err}"
    );
}
