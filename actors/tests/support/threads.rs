//! Sessions used from several worker threads at once, as the HTTP workers of a relay use them.

use api_relay_actors::SessionHandle;

/// Runs `work` with a clone of `session` on `threads` new arbiters at once and returns what each
/// returned. The handles serve sequence numbers on those threads, not on the session's own.
pub async fn on_threads<T, F, Fut>(session: &SessionHandle, threads: usize, work: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(SessionHandle, usize) -> Fut + Send + Clone + 'static,
    Fut: std::future::Future<Output = T> + 'static,
{
    let mut receivers = Vec::new();
    let mut arbiters = Vec::new();
    for index in 0..threads {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let arbiter = actix::Arbiter::new();
        let (session, work) = (session.clone(), work.clone());
        arbiter.spawn_fn(move || {
            actix::spawn(async move {
                let _ = sender.send(work(session, index).await);
            });
        });
        receivers.push(receiver);
        arbiters.push(arbiter);
    }
    let mut results = Vec::new();
    for receiver in receivers {
        results.push(receiver.await.expect("arbiter finished its work"));
    }
    for arbiter in arbiters {
        arbiter.stop();
    }
    results
}
