//! The log output: records collect in one shared buffer, and a writer thread copies the buffer to
//! stdout in batches.
//!
//! A record costs its thread one short lock and a copy. The writer thread is woken only when a
//! record lands in an empty buffer, writes what is there at once, and then lets records collect
//! for `BATCH_WINDOW` before its next write. An idle relay writes each record as it comes; a busy
//! one writes about a hundred times a second, however many requests it serves. Waking a writer
//! thread for each record had cost a futex wake, a context switch and a `write` per request.
//!
//! The buffer never drops records. When stdout takes them more slowly than they come and the
//! buffer reaches `MAX_PENDING_BYTES`, the threads that log wait until the writer drains it.
//! Only records that come after the guard closed the buffer, or when the writer thread could
//! not start, are dropped, because no thread would ever write them.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long records collect after a write before the next one.
const BATCH_WINDOW: Duration = Duration::from_millis(10);

/// Pending bytes at which the writer is woken before its window ends.
const EARLY_WRITE_BYTES: usize = 64 * 1024;

/// Pending bytes at which logging threads wait for the writer.
const MAX_PENDING_BYTES: usize = 8 * 1024 * 1024;

struct Pending {
    bytes: Vec<u8>,
    closed: bool,
    /// The writer waits for a first record, not for the end of a batch window.
    writer_idle: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    /// Signals the writer: a record came while it was idle, the buffer passed
    /// `EARLY_WRITE_BYTES`, or the guard closed it.
    wake_writer: Condvar,
    /// Signals logging threads that wait for room: the writer took the buffer.
    drained: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A thread that panicked while holding the lock left whole records behind: the buffer
        // only ever grows by complete `write` calls.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Maker of the sinks that records are written to, all appending to the shared buffer.
#[derive(Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

/// Owner of the writer thread. Dropping it writes what is still pending and stops the thread, so
/// keep it until the process ends.
pub struct WriterGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread for `output`.
pub fn spawn<W>(output: W) -> (BatchWriter, WriterGuard)
where
    W: Write + Send + 'static,
{
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending {
            bytes: Vec::with_capacity(EARLY_WRITE_BYTES),
            closed: false,
            writer_idle: false,
        }),
        wake_writer: Condvar::new(),
        drained: Condvar::new(),
    });
    let thread = {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new().name("api-relay-log".into()).spawn(move || write_batches(&shared, output))
    };
    let thread = match thread {
        Ok(thread) => Some(thread),
        Err(error) => {
            // Without the thread no record would reach stdout, so the error goes to stderr. The
            // buffer is closed, so loggers drop their records instead of waiting for room.
            eprintln!("api-relay: failed to start the log writer thread: {error}; log records are dropped");
            shared.lock().closed = true;
            None
        }
    };
    (BatchWriter { shared: Arc::clone(&shared) }, WriterGuard { shared, thread })
}

fn write_batches<W: Write>(shared: &Shared, mut output: W) {
    let mut batch = Vec::with_capacity(EARLY_WRITE_BYTES);
    loop {
        let mut pending = shared.lock();
        while pending.bytes.is_empty() && !pending.closed {
            pending.writer_idle = true;
            pending = shared.wake_writer.wait(pending).unwrap_or_else(PoisonError::into_inner);
        }
        pending.writer_idle = false;
        if pending.bytes.is_empty() {
            return;
        }
        std::mem::swap(&mut pending.bytes, &mut batch);
        let closed = pending.closed;
        drop(pending);
        shared.drained.notify_all();

        // A failed write loses this batch only; the next batch is tried again.
        let _ = output.write_all(&batch).and_then(|()| output.flush());
        batch.clear();
        if batch.capacity() > 4 * EARLY_WRITE_BYTES {
            batch.shrink_to(EARLY_WRITE_BYTES);
        }

        if !closed {
            let pending = shared.lock();
            if pending.bytes.len() < EARLY_WRITE_BYTES && !pending.closed {
                drop(shared.wake_writer.wait_timeout(pending, BATCH_WINDOW));
            }
        }
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake_writer.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The sink of one record.
pub struct RecordSink<'a> {
    shared: &'a Shared,
}

impl Write for RecordSink<'_> {
    fn write(&mut self, record: &[u8]) -> std::io::Result<usize> {
        let mut pending = self.shared.lock();
        while pending.bytes.len() >= MAX_PENDING_BYTES && !pending.closed {
            pending = self.shared.drained.wait(pending).unwrap_or_else(PoisonError::into_inner);
        }
        if pending.closed {
            return Ok(record.len());
        }
        let before = pending.bytes.len();
        pending.bytes.extend_from_slice(record);
        let wake =
            pending.writer_idle || (before < EARLY_WRITE_BYTES && pending.bytes.len() >= EARLY_WRITE_BYTES);
        pending.writer_idle = false;
        drop(pending);
        if wake {
            self.shared.wake_writer.notify_one();
        }
        Ok(record.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = RecordSink<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        RecordSink { shared: &self.shared }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    /// An output that hands each write to a channel, as one batch.
    struct Batches(mpsc::Sender<Vec<u8>>);

    impl Write for Batches {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.send(bytes.to_vec());
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn record(writer: &BatchWriter, text: &str) {
        writer.make_writer().write_all(text.as_bytes()).expect("writing a record never fails");
    }

    #[test]
    fn idle_writer_writes_first_record_at_once() {
        let (sender, batches) = mpsc::channel();
        let (writer, _guard) = spawn(Batches(sender));
        record(&writer, "one\n");
        // Nothing else happens: no second record, no guard dropped.
        let batch = batches.recv_timeout(Duration::from_secs(5)).expect("no batch written");
        assert_eq!(batch, b"one\n");
    }

    #[test]
    fn concurrent_records_share_writes_in_order() {
        let (sender, batches) = mpsc::channel();
        let (writer, guard) = spawn(Batches(sender));
        let threads: Vec<_> = (0..4)
            .map(|thread| {
                let writer = writer.clone();
                std::thread::spawn(move || {
                    for n in 0..2_000 {
                        record(&writer, &format!("{thread} {n}\n"));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("a logging thread panicked");
        }
        drop(guard);

        let batches: Vec<Vec<u8>> = batches.try_iter().collect();
        let text = String::from_utf8(batches.concat()).expect("records are text");
        let mut next = [0_u32; 4];
        for line in text.lines() {
            let (thread, n) = line.split_once(' ').expect("a record is `thread n`");
            let (thread, n): (usize, u32) = (thread.parse().unwrap(), n.parse().unwrap());
            assert_eq!(n, next[thread], "thread {thread}: records out of order or lost");
            next[thread] += 1;
        }
        assert_eq!(next, [2_000; 4], "every record is written exactly once");
        assert!(batches.len() < 8_000 / 10, "{} writes for 8,000 records", batches.len());
    }

    #[test]
    fn dropped_guard_writes_pending_records() {
        let (sender, batches) = mpsc::channel();
        let (writer, guard) = spawn(Batches(sender));
        for n in 0..100 {
            record(&writer, &format!("{n}\n"));
        }
        drop(guard);
        let written: usize = batches.try_iter().map(|batch| batch.len()).sum();
        assert_eq!(written, (0..100).map(|n: i32| format!("{n}\n").len()).sum::<usize>());
    }

    #[test]
    fn records_after_close_are_dropped() {
        let (sender, batches) = mpsc::channel();
        let (writer, guard) = spawn(Batches(sender));
        drop(guard);
        // 9 MiB: past the buffer's limit, where an open buffer would make the logger wait.
        for _ in 0..9 {
            record(&writer, &("x".repeat(1024 * 1024 - 1) + "\n"));
        }
        assert_eq!(batches.try_iter().count(), 0, "a record written after close reached the output");
        assert!(writer.shared.lock().bytes.is_empty(), "records after close stay in the buffer");
    }

    #[test]
    fn full_buffer_blocks_instead_of_dropping() {
        /// An output that lets through one write per message on `permits`.
        struct Gate(mpsc::Receiver<()>, mpsc::Sender<usize>);

        impl Write for Gate {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                let _ = self.0.recv_timeout(Duration::from_secs(10));
                let _ = self.1.send(bytes.len());
                Ok(bytes.len())
            }

            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }

        let (permit, permits) = mpsc::channel();
        let (sender, written) = mpsc::channel();
        let (writer, guard) = spawn(Gate(permits, sender));
        let chunk = "x".repeat(1024 * 1024 - 1) + "\n";
        let logger = {
            let writer = writer.clone();
            let chunk = chunk.clone();
            std::thread::spawn(move || {
                for _ in 0..20 {
                    record(&writer, &chunk);
                }
            })
        };
        // The writer holds its first batch until a permit comes, so the logger fills the
        // buffer to its limit and waits there.
        std::thread::sleep(Duration::from_millis(300));
        assert!(!logger.is_finished(), "20 MiB fit into a buffer of {MAX_PENDING_BYTES} bytes");
        for _ in 0..40 {
            let _ = permit.send(());
        }
        logger.join().expect("the logger panicked");
        drop(guard);
        let total: usize = written.try_iter().sum();
        assert_eq!(total, 20 * chunk.len(), "records were dropped");
    }
}
