//! An action's life as one type (issue 12): its phases (`ActionState`, the
//! control API's enum, which is also what the store persists), the moves
//! allowed between them, and where a restart picks an action up from what
//! the store kept ([`Start::of`]). Before this the same knowledge lived in
//! four places kept in step by hand: the control table, the stored
//! record's `i32`, the runner's start enum and recovery's match.
//!
//! The moves:
//!
//! ```text
//! accepted ──> pulling ──> running ──> finished ──> reported
//!    │            │                      │  ^
//!    │            └──────> finished      v  │
//!    ├──> running (re-attached)       undeliverable ──> reported (dropped)
//!    └──> finished (never ran: cancelled, refused; or its report recovered)
//! ```
//!
//! Staying in a phase is always allowed (a retry while containerd is away
//! pulls again). Every other move is a bug: it is refused, the phase stays,
//! and the refusal is logged at error with both phases, so the control API
//! never shows, and the store never keeps, a life that cannot happen (a
//! running action "accepted" again, a reported one running).
//!
//! Owns no I/O: the table (`crate::actions`) and the record
//! (`crate::store::StoredAction`) each hold their phase and move it
//! through [`advance`].

use crate::proto::control::ActionState;
use crate::proto::flow::ReportActionResultsRequest;
use crate::store::StoredAction;

/// Whether an action in phase `from` may go to `to`.
pub fn can_become(from: ActionState, to: ActionState) -> bool {
    use ActionState::*;
    from == to
        || matches!(
            (from, to),
            (Unspecified, Accepted)
                | (Accepted, Pulling | Running | Finished)
                | (Pulling, Running | Finished)
                | (Running, Finished)
                | (Finished, Reported | Undeliverable)
                | (Undeliverable, Finished | Reported)
        )
}

/// Moves `state` (an encoded [`ActionState`]) to `to` if the move is
/// allowed; otherwise leaves it and logs the refusal. Returns whether it
/// moved (or stayed, which is allowed).
pub fn advance(state: &mut i32, to: ActionState, what: &str) -> bool {
    let from = ActionState::try_from(*state).unwrap_or(ActionState::Unspecified);
    if can_become(from, to) {
        *state = to as i32;
        return true;
    }
    tracing::error!(
        from = crate::actions::state_name(from),
        to = crate::actions::state_name(to),
        of = what,
        "illegal lifecycle transition refused (a bug)"
    );
    false
}

/// Where a run starts: a new action, one recovered after a restart whose
/// task may still be running, or one whose report is still to deliver.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    Fresh,
    Resume { deadline_ms: i64 },
    Deliver(ReportActionResultsRequest),
}

impl Start {
    /// Where a restart picks up the action the store kept as `record`: a
    /// finished one with its report delivers it (parked or not); a running
    /// one is re-attached, deadline and all; anything else never started a
    /// task and runs again from the beginning (a pull is not stored: it
    /// is started over, which costs nothing but the pull). A finished
    /// record without a report cannot be written; it runs again rather
    /// than be lost.
    pub fn of(record: &StoredAction) -> Start {
        match (record.state(), &record.report) {
            (ActionState::Finished | ActionState::Undeliverable, Some(report)) => {
                Start::Deliver(report.clone())
            }
            (ActionState::Running, _) => Start::Resume {
                deadline_ms: record.deadline_ms,
            },
            _ => Start::Fresh,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ActionState::*;

    const ALL: [ActionState; 7] = [
        Unspecified,
        Accepted,
        Pulling,
        Running,
        Finished,
        Reported,
        Undeliverable,
    ];

    #[test]
    fn only_the_drawn_moves_are_allowed() {
        let allowed: Vec<(ActionState, ActionState)> = ALL
            .iter()
            .flat_map(|&a| ALL.iter().map(move |&b| (a, b)))
            .filter(|&(a, b)| a != b && can_become(a, b))
            .collect();
        assert_eq!(
            allowed,
            vec![
                (Unspecified, Accepted),
                (Accepted, Pulling),
                (Accepted, Running),
                (Accepted, Finished),
                (Pulling, Running),
                (Pulling, Finished),
                (Running, Finished),
                (Finished, Reported),
                (Finished, Undeliverable),
                (Undeliverable, Finished),
                (Undeliverable, Reported),
            ]
        );
        for s in ALL {
            assert!(can_become(s, s), "{s:?} may stay");
        }
    }

    #[test]
    fn a_refused_move_leaves_the_phase() {
        let mut state = Running as i32;
        assert!(!advance(&mut state, Accepted, "test"));
        assert_eq!(state, Running as i32);
        assert!(!advance(&mut state, Pulling, "test"));
        assert!(advance(&mut state, Finished, "test"));
        assert!(!advance(&mut state, Running, "test"));
        assert_eq!(state, Finished as i32);
    }

    #[test]
    fn a_restart_picks_up_from_the_stored_phase() {
        let report = ReportActionResultsRequest::default();
        let record =
            |state: ActionState, report: Option<ReportActionResultsRequest>| StoredAction {
                state: state as i32,
                deadline_ms: 77,
                report,
                ..Default::default()
            };
        assert_eq!(Start::of(&record(Accepted, None)), Start::Fresh);
        assert_eq!(Start::of(&record(Pulling, None)), Start::Fresh);
        assert_eq!(
            Start::of(&record(Running, None)),
            Start::Resume { deadline_ms: 77 }
        );
        assert_eq!(
            Start::of(&record(Finished, Some(report.clone()))),
            Start::Deliver(report.clone())
        );
        assert_eq!(
            Start::of(&record(Undeliverable, Some(report.clone()))),
            Start::Deliver(report)
        );
        assert_eq!(Start::of(&record(Finished, None)), Start::Fresh);
    }
}
