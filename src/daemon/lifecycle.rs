//! VM lifecycle events for `agentvm events`, found by polling libvirt.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast;

use super::protocol::Event;
use crate::backend::State;
use crate::backend::libvirt::LocalBackend;

const POLL: Duration = Duration::from_millis(500);

/// Polls the VMs' states while anyone listens and broadcasts each change.
pub async fn watch(backend: Arc<LocalBackend>, events: broadcast::Sender<Event>) {
    let mut last: Option<BTreeMap<String, State>> = None;
    loop {
        tokio::time::sleep(POLL).await;
        if events.receiver_count() == 0 {
            last = None;
            continue;
        }
        let b = backend.clone();
        let Ok(Ok(states)) = tokio::task::spawn_blocking(move || b.states()).await else {
            continue;
        };
        let now: BTreeMap<String, State> = states.into_iter().collect();
        if let Some(before) = &last {
            for change in changes(before, &now) {
                let _ = events.send(change);
            }
        }
        last = Some(now);
    }
}

fn changes(before: &BTreeMap<String, State>, now: &BTreeMap<String, State>) -> Vec<Event> {
    let at = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let event = |vm: &str, state: &str| Event::Lifecycle {
        vm: vm.to_string(),
        state: state.to_string(),
        at,
    };
    let mut out = Vec::new();
    for (vm, state) in now {
        match before.get(vm) {
            None => {
                out.push(event(vm, "defined"));
                if *state != State::Stopped {
                    out.push(event(vm, transition(*state)));
                }
            }
            Some(old) if old != state => out.push(event(vm, transition(*state))),
            Some(_) => {}
        }
    }
    for vm in before.keys().filter(|vm| !now.contains_key(*vm)) {
        out.push(event(vm, "undefined"));
    }
    out
}

fn transition(state: State) -> &'static str {
    match state {
        State::Running => "started",
        State::Stopped => "stopped",
        State::Crashed => "crashed",
        State::Absent => "undefined",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states(list: &[(&str, State)]) -> BTreeMap<String, State> {
        list.iter().map(|(n, s)| (n.to_string(), *s)).collect()
    }

    fn names(events: Vec<Event>) -> Vec<(String, String)> {
        events
            .into_iter()
            .map(|e| match e {
                Event::Lifecycle { vm, state, .. } => (vm, state),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn reports_starts_stops_crashes_and_removals() {
        let before = states(&[
            ("a", State::Stopped),
            ("b", State::Running),
            ("c", State::Running),
        ]);
        let now = states(&[
            ("a", State::Running),
            ("b", State::Crashed),
            ("d", State::Running),
        ]);
        let got = names(changes(&before, &now));
        let want: Vec<(String, String)> = [
            ("a", "started"),
            ("b", "crashed"),
            ("d", "defined"),
            ("d", "started"),
            ("c", "undefined"),
        ]
        .iter()
        .map(|(v, s)| (v.to_string(), s.to_string()))
        .collect();
        assert_eq!(got, want);
        assert!(changes(&now, &now).is_empty());
    }
}
