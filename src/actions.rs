//! The table of accepted actions: which (namespace, actionId) pairs are in
//! flight, so a duplicate is refused, and the handle to cancel each.
//! In memory; durability is the store's job.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio_util::sync::CancellationToken;

use crate::error::Error;

type Key = (String, String);

#[derive(Default)]
pub struct Actions {
    inner: Mutex<HashMap<Key, CancellationToken>>,
}

impl Actions {
    /// Claims the pair, or says it is taken.
    pub fn claim(&self, namespace: &str, action_id: &str) -> Result<CancellationToken, Error> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let key = (namespace.to_string(), action_id.to_string());
        if map.contains_key(&key) {
            return Err(Error::AlreadyExists {
                namespace: namespace.into(),
                action_id: action_id.into(),
            });
        }
        let token = CancellationToken::new();
        map.insert(key, token.clone());
        Ok(token)
    }

    /// Frees the pair once the action is reported and cleaned up.
    pub fn release(&self, namespace: &str, action_id: &str) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&(namespace.to_string(), action_id.to_string()));
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cancels one action; false if it is not in flight.
    pub fn cancel(&self, namespace: &str, action_id: &str) -> bool {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&(namespace.to_string(), action_id.to_string())) {
            Some(t) => {
                t.cancel();
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_release() {
        let a = Actions::default();
        a.claim("n", "x").unwrap();
        assert!(matches!(
            a.claim("n", "x"),
            Err(Error::AlreadyExists { .. })
        ));
        a.claim("m", "x").unwrap();
        assert_eq!(a.len(), 2);
        assert!(a.cancel("n", "x"));
        a.release("n", "x");
        assert!(!a.cancel("n", "x"));
        a.claim("n", "x").unwrap();
    }
}
