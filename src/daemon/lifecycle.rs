//! VM lifecycle events for `agentvm events`, found by polling every backend.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::Shared;
use crate::backend::State;
use crate::protocol::Event;

const POLL: Duration = Duration::from_millis(500);
/// Remote backends are asked every this many polls (each ask is an API call).
const REMOTE_EVERY: u32 = 4;

/// A VM as the watcher keys it: (backend, name).
type Key = (String, String);

/// Polls the VMs' states while anyone listens and broadcasts each change. A
/// backend that cannot be polled is logged (once per distinct error) and its
/// VMs keep their last known state.
pub async fn watch(shared: Arc<Shared>) {
    let mut last: Option<BTreeMap<Key, State>> = None;
    let mut errors: BTreeMap<String, String> = BTreeMap::new();
    let mut tick: u32 = 0;
    // Problems already reported: (backend, VM, problem).
    let mut problems: BTreeSet<(String, String, String)> = BTreeSet::new();
    loop {
        tokio::time::sleep(POLL).await;
        if shared.lifecycle.receiver_count() == 0 {
            last = None;
            continue;
        }
        tick = tick.wrapping_add(1);
        let backends = shared.registry.all();
        let remote_turn = last.is_none() || tick.is_multiple_of(REMOTE_EVERY);
        let polled = tokio::task::spawn_blocking(move || {
            backends
                .iter()
                .filter(|(name, _)| remote_turn || *name == crate::spec::LOCAL_BACKEND)
                .map(|(name, b)| {
                    let problems = b.share_problems().unwrap_or_default();
                    (
                        name.to_string(),
                        b.states().map_err(|e| format!("{e:#}")),
                        problems,
                    )
                })
                .collect::<Vec<_>>()
        })
        .await;
        let polled = match polled {
            Ok(polled) => polled,
            Err(e) => {
                tracing::warn!("polling VM states failed: {e}");
                continue;
            }
        };
        let mut now = last.clone().unwrap_or_default();
        let mut problems_now = BTreeSet::new();
        for (backend, _, found) in &polled {
            for (vm, problem) in found {
                let key = (backend.clone(), vm.clone(), problem.clone());
                if !problems.contains(&key) {
                    tracing::warn!("{vm}: {problem}");
                    let _ = shared.lifecycle.send(Event::Problem {
                        vm: vm.clone(),
                        backend: backend.clone(),
                        problem: problem.clone(),
                        at: unix_now(),
                    });
                }
                problems_now.insert(key);
            }
        }
        problems = problems_now;
        for (backend, states, _) in polled {
            match states {
                Ok(states) => {
                    if errors.remove(&backend).is_some() {
                        tracing::info!("backend {backend} answers again");
                    }
                    now.retain(|(b, _), _| *b != backend);
                    now.extend(states.into_iter().map(|(vm, s)| ((backend.clone(), vm), s)));
                }
                Err(e) => {
                    if errors.get(&backend) != Some(&e) {
                        tracing::warn!("polling the VM states of backend {backend}: {e}");
                        errors.insert(backend, e);
                    }
                }
            }
        }
        if let Some(before) = &last {
            for change in changes(before, &now) {
                let _ = shared.lifecycle.send(change);
            }
        }
        last = Some(now);
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn changes(before: &BTreeMap<Key, State>, now: &BTreeMap<Key, State>) -> Vec<Event> {
    let at = unix_now();
    let event = |(backend, vm): &Key, state: &str| Event::Lifecycle {
        vm: vm.clone(),
        backend: backend.clone(),
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
        State::Unknown => "unreachable",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states(list: &[(&str, State)]) -> BTreeMap<Key, State> {
        list.iter()
            .map(|(n, s)| (("local".to_string(), n.to_string()), *s))
            .collect()
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
