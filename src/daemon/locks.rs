//! One operation at a time per VM. A second request for a busy VM waits its
//! turn, or with `no_block` fails at once naming what holds the VM and since when.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

#[derive(Default)]
pub struct VmLocks {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

#[derive(Default)]
struct Slot {
    turn: Arc<AsyncMutex<()>>,
    holder: Mutex<Option<(String, SystemTime)>>,
}

/// Held while an operation runs on a VM; dropping it lets the next one in.
pub struct VmGuard {
    slot: Arc<Slot>,
    _turn: OwnedMutexGuard<()>,
}

impl Drop for VmGuard {
    fn drop(&mut self) {
        *self.slot.holder.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

#[derive(Debug, thiserror::Error)]
#[error("busy: {op} since {since}")]
pub struct Busy {
    pub op: String,
    pub since: String,
}

impl VmLocks {
    fn slot(&self, vm: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry(vm.to_string()).or_default().clone()
    }

    /// Waits for `vm` (or, with `no_block`, fails if it is busy) and records `op` as its holder.
    pub async fn acquire(&self, vm: &str, op: &str, no_block: bool) -> Result<VmGuard, Busy> {
        let slot = self.slot(vm);
        let turn = if no_block {
            slot.turn.clone().try_lock_owned().map_err(|_| {
                let holder = slot
                    .holder
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let (op, since) =
                    holder.unwrap_or_else(|| ("an operation".into(), SystemTime::now()));
                Busy {
                    op,
                    since: crate::clock::format_time(since),
                }
            })?
        } else {
            slot.turn.clone().lock_owned().await
        };
        *slot.holder.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((op.to_string(), SystemTime::now()));
        Ok(VmGuard { slot, _turn: turn })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn no_block_reports_the_holder_and_waiting_gets_a_turn() {
        let locks = Arc::new(VmLocks::default());
        let guard = locks.acquire("drago", "up", false).await.unwrap();
        let busy = locks.acquire("drago", "down", true).await.err().unwrap();
        assert_eq!(busy.op, "up");
        assert!(busy.to_string().starts_with("busy: up since 20"), "{busy}");
        // Another VM is independent.
        locks.acquire("luce", "up", true).await.unwrap();
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move { locks.acquire("drago", "down", false).await.is_ok() })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "waits while the VM is held");
        drop(guard);
        assert!(waiter.await.unwrap());
    }
}
