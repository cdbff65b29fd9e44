//! openraft's runtime with coalesced group clocks.
//!
//! openraft 0.9 runs one timer task per group that wakes every 1.5 heartbeat intervals
//! (300 ms here), even while the group is quiesced and its ticks are switched off: with
//! every group's timer at its own phase, 1,000 groups wake a node's threads ~3,300 times a
//! second for nothing. openraft asks its runtime for exactly one kind of timer that way:
//! [`AsyncRuntime::sleep_until`] is used by the tick loop alone (replication backoff and
//! snapshot retries use [`AsyncRuntime::sleep`]). [`CoalescedTokio`] is tokio with that one
//! call changed: the deadline moves to the nearest point of a process-wide grid of
//! [`TICK_GRID_MS`], so the timers of every group on the node fire together, a few times
//! a second, in one wake-up of one thread. A tick moves by at most half a grid step;
//! the election timeouts it checks (300–450 ms) already allow far more, and failover does
//! not wait on them (node liveness triggers the campaigns, [`crate::registry`]).
//!
//! A quiesced group's timer does not wake at all: each group's tasks are spawned inside the
//! scope of its [`GroupClock`] (a task-local, set around `Raft::new`), and while the
//! registry holds that clock paused, the tick loop's sleep waits for it to resume instead
//! of a deadline; one tick period after it resumes, the loop ticks again. An idle node
//! with thousands of quiesced groups then has no per-group timer at all.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;

use openraft::{AsyncRuntime, OptionalSend, TokioInstant, TokioRuntime};

/// Spacing of the grid every group's tick deadline is moved to, in milliseconds. Must stay
/// well under openraft's tick interval (1.5 × its heartbeat interval, ≥ 150 ms here) so a
/// tick never moves by more than a third of its period.
pub const TICK_GRID_MS: u64 = 100;

/// The grid's origin: the last whole second of the wall clock before the first time it was
/// asked for. Nodes whose clocks agree (one host, or NTP) then share the grid, so a ping
/// from one arrives while the other is awake for its own ticks anyway.
fn epoch() -> TokioInstant {
    static EPOCH: OnceLock<TokioInstant> = OnceLock::new();
    *EPOCH.get_or_init(|| {
        let now = TokioInstant::now();
        let into_second = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(Duration::ZERO, |d| {
                Duration::from_nanos(u64::from(d.subsec_nanos()))
            });
        now.checked_sub(into_second).unwrap_or(now)
    })
}

/// `deadline` moved to the nearest multiple of `grid` after `origin` (never before it).
pub(crate) fn coalesce(
    origin: TokioInstant,
    deadline: TokioInstant,
    grid: Duration,
) -> TokioInstant {
    let grid_ns = grid.as_nanos().max(1);
    let Some(offset) = deadline.checked_duration_since(origin) else {
        return deadline;
    };
    let steps = (offset.as_nanos() + grid_ns / 2) / grid_ns;
    let rounded = steps.saturating_mul(grid_ns);
    match u64::try_from(rounded) {
        Ok(ns) => origin + Duration::from_nanos(ns),
        Err(_) => deadline,
    }
}

/// A `tokio::time::interval` of `period` whose ticks fall on the process-wide grid of that
/// period (multiples of it since the grid's origin), so that the node's periodic tasks of
/// the same period (the registry's ticker, one pinger per peer) wake together, in one
/// wake-up of one thread, not each at its own phase. Missed ticks are delayed, not
/// bunched.
pub fn grid_interval(period: Duration) -> tokio::time::Interval {
    let period = period.max(Duration::from_millis(1));
    let origin = epoch();
    let now = TokioInstant::now();
    let since = now.saturating_duration_since(origin).as_nanos();
    let step = period.as_nanos().max(1);
    let next = (since / step + 1).saturating_mul(step);
    let start = u64::try_from(next).map_or(now, |ns| origin + Duration::from_nanos(ns));
    let mut interval = tokio::time::interval_at(start, period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}

/// One group's clock switch: paused while the group is quiesced on this node.
#[derive(Debug, Default)]
pub(crate) struct GroupClock {
    paused: AtomicBool,
    resumed: Notify,
}

impl GroupClock {
    /// Pauses (`true`) or resumes the group's tick timer.
    pub(crate) fn set_paused(&self, paused: bool) {
        let was = self.paused.swap(paused, Ordering::AcqRel);
        if was && !paused {
            self.resumed.notify_waiters();
        }
    }

    /// Waits while the clock is paused (no wake-up is lost to a concurrent resume: the
    /// waiter is registered before the switch is read).
    async fn until_running(&self) -> bool {
        let notified = self.resumed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !self.paused.load(Ordering::Acquire) {
            return false;
        }
        notified.await;
        true
    }
}

tokio::task_local! {
    /// The clock of the group whose tasks are running (set around `Raft::new`, carried
    /// into every task openraft spawns from there).
    static GROUP_CLOCK: Arc<GroupClock>;
}

/// Runs `f` (a group's `Raft::new`) with `clock` as the clock of every task it spawns.
pub(crate) async fn with_group_clock<F: Future>(clock: Arc<GroupClock>, f: F) -> F::Output {
    GROUP_CLOCK.scope(clock, f).await
}

/// tokio, with every group's tick timer on one grid (module docs).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CoalescedTokio;

impl AsyncRuntime for CoalescedTokio {
    type JoinError = <TokioRuntime as AsyncRuntime>::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = <TokioRuntime as AsyncRuntime>::JoinHandle<T>;
    type Sleep = Pin<Box<dyn Future<Output = ()> + Send + Sync>>;
    type Instant = TokioInstant;
    type TimeoutError = <TokioRuntime as AsyncRuntime>::TimeoutError;
    type Timeout<R, T: Future<Output = R> + OptionalSend> =
        <TokioRuntime as AsyncRuntime>::Timeout<R, T>;
    type ThreadLocalRng = <TokioRuntime as AsyncRuntime>::ThreadLocalRng;
    type OneshotSender<T: OptionalSend> = <TokioRuntime as AsyncRuntime>::OneshotSender<T>;
    type OneshotReceiverError = <TokioRuntime as AsyncRuntime>::OneshotReceiverError;
    type OneshotReceiver<T: OptionalSend> = <TokioRuntime as AsyncRuntime>::OneshotReceiver<T>;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        match GROUP_CLOCK.try_with(Arc::clone) {
            Ok(clock) => TokioRuntime::spawn(GROUP_CLOCK.scope(clock, future)),
            Err(_) => TokioRuntime::spawn(future),
        }
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        Box::pin(TokioRuntime::sleep(duration))
    }

    /// The tick loop's timer: moved onto the grid, and stopped while the group's clock is
    /// paused (then one period from the resume).
    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        let grid = Duration::from_millis(TICK_GRID_MS);
        let at = coalesce(epoch(), deadline, grid);
        let Ok(clock) = GROUP_CLOCK.try_with(Arc::clone) else {
            return Box::pin(TokioRuntime::sleep_until(at));
        };
        let period = deadline.saturating_duration_since(TokioInstant::now());
        Box::pin(async move {
            let at = if clock.until_running().await {
                coalesce(epoch(), TokioInstant::now() + period, grid)
            } else {
                at
            };
            tokio::time::sleep_until(at).await;
        })
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        TokioRuntime::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        TokioRuntime::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        TokioRuntime::is_panic(join_error)
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        TokioRuntime::thread_rng()
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        TokioRuntime::oneshot()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[tokio::test]
    async fn a_paused_group_clock_holds_its_timer_until_resumed_then_runs_one_period() {
        let clock = Arc::new(GroupClock::default());
        clock.set_paused(true);
        let fired = Arc::new(AtomicBool::new(false));
        let (c, f) = (clock.clone(), fired.clone());
        #[allow(clippy::async_yields_async)]
        let task = with_group_clock(clock.clone(), async move {
            // Spawned from within the scope, like openraft's tick loop.
            CoalescedTokio::spawn(async move {
                let _ = &c;
                CoalescedTokio::sleep_until(TokioInstant::now() + Duration::from_millis(300)).await;
                f.store(true, Ordering::SeqCst);
            })
        })
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            !fired.load(Ordering::SeqCst),
            "a paused clock's timer does not fire"
        );
        clock.set_paused(false);
        let resumed = TokioInstant::now();
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(
            !fired.load(Ordering::SeqCst),
            "it runs a whole period after the resume"
        );
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the timer fires once resumed")
            .unwrap();
        let took = TokioInstant::now().duration_since(resumed);
        assert!(took >= Duration::from_millis(250), "{took:?}");
        // Outside any group's scope the timer runs as usual.
        let start = TokioInstant::now();
        CoalescedTokio::sleep_until(start + Duration::from_millis(300)).await;
        assert!(TokioInstant::now() > start);
    }

    #[tokio::test]
    async fn grid_intervals_of_one_period_tick_at_the_same_instants() {
        let period = Duration::from_millis(20);
        let mut a = grid_interval(period);
        tokio::time::sleep(Duration::from_millis(7)).await;
        let mut b = grid_interval(period);
        let (a1, b1) = (a.tick().await, b.tick().await);
        let apart = b1.duration_since(a1).as_nanos();
        assert_eq!(
            apart % period.as_nanos(),
            0,
            "b ticks on a's grid ({apart} ns apart)"
        );
        let off = b1.duration_since(epoch()).as_nanos() % period.as_nanos();
        assert_eq!(
            off, 0,
            "ticks fall on multiples of the period since the origin"
        );
    }

    #[test]
    fn deadlines_move_to_the_nearest_grid_point_by_at_most_half_a_step() {
        let origin = TokioInstant::now();
        let grid = Duration::from_millis(100);
        let at = |ms: u64| origin + Duration::from_millis(ms);
        assert_eq!(coalesce(origin, at(300), grid), at(300));
        assert_eq!(coalesce(origin, at(349), grid), at(300));
        assert_eq!(coalesce(origin, at(350), grid), at(400));
        assert_eq!(coalesce(origin, at(301), grid), at(300));
        assert_eq!(coalesce(origin, at(0), grid), at(0));
        // Timers of groups started at different moments land on the same instants.
        let a = coalesce(origin, at(1_000 + 317), grid);
        let b = coalesce(origin, at(1_000 + 291), grid);
        assert_eq!(a, b);
        // Before the origin (cannot happen after the first call): left as it is.
        let early = origin.checked_sub(Duration::from_millis(5));
        if let Some(early) = early {
            assert_eq!(coalesce(origin, early, grid), early);
        }
        // A 300 ms tick period stays 300 ms on the 100 ms grid while the timer task wakes
        // less than half a step late, whatever phase the group started at.
        for phase in (0..300u64).step_by(7) {
            let first = coalesce(origin, at(10_000 + phase), grid);
            for late in 0..50u64 {
                let woke = first + Duration::from_millis(late);
                let next = coalesce(origin, woke + Duration::from_millis(300), grid);
                assert_eq!(next.duration_since(first), Duration::from_millis(300));
            }
        }
    }
}
