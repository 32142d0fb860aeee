//! Progress on the terminal: indicatif bars on stderr when it is a terminal, nothing otherwise.

use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::pipeline::{Progress, ProgressEvent, Stage};

/// A byte bar on stderr when it is a terminal, hidden otherwise.
pub(crate) fn bytes_bar(total: Option<u64>, label: &str) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = match total {
        Some(t) => ProgressBar::with_draw_target(Some(t), target).with_style(
            ProgressStyle::with_template(
                "{prefix:>7} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        ),
        None => ProgressBar::with_draw_target(None, target).with_style(
            ProgressStyle::with_template("{prefix:>7} {spinner} {bytes} {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.set_prefix(label.to_owned());
    bar
}

/// Draws one bar per stage as the pipeline reports.
#[derive(Default)]
pub(crate) struct TerminalProgress {
    current: Mutex<Option<(Stage, ProgressBar)>>,
}

impl TerminalProgress {
    pub(crate) fn clear(&self) {
        if let Ok(mut current) = self.current.lock() {
            if let Some((_, bar)) = current.take() {
                bar.finish_and_clear();
            }
        }
    }
}

impl Progress for TerminalProgress {
    fn report(&self, event: ProgressEvent<'_>) {
        let Ok(mut current) = self.current.lock() else {
            return;
        };
        // A streamed deploy exports and uploads at once, reporting both for every chunk: the
        // export's bar (of the image's size) stands for the stream until it finishes, instead of
        // two bars taking turns thousands of times.
        let streaming = event.stage == Stage::Upload
            && event.message.is_none()
            && !event.finished
            && current
                .as_ref()
                .is_some_and(|(stage, bar)| *stage == Stage::Export && !bar.is_finished());
        if streaming {
            return;
        }
        if current.as_ref().map(|(s, _)| *s) != Some(event.stage) {
            if let Some((_, bar)) = current.take() {
                bar.finish_and_clear();
            }
            let counts_bytes = !matches!(event.stage, Stage::Build | Stage::Deploy);
            let total = if counts_bytes { event.total } else { None };
            let bar = bytes_bar(total, event.stage.as_str());
            if !counts_bytes {
                bar.set_style(
                    ProgressStyle::with_template("{prefix:>7} {spinner} {wide_msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
            }
            if event.stage == Stage::Deploy {
                // Nothing reports while the receiver works: keep the spinner turning.
                bar.enable_steady_tick(std::time::Duration::from_millis(120));
            }
            *current = Some((event.stage, bar));
        }
        let Some((_, bar)) = current.as_ref() else {
            return;
        };
        if let Some(message) = event.message {
            bar.set_message(message.to_owned());
            bar.tick();
        } else if !matches!(event.stage, Stage::Build | Stage::Deploy) {
            if let Some(total) = event.total {
                if bar.length() != Some(total.max(event.done)) {
                    bar.set_length(total.max(event.done));
                }
            }
            bar.set_position(event.done);
        }
        if event.finished {
            bar.finish_and_clear();
        }
    }
}

/// Whether this process printed its JSON document on stdout yet (a command prints at most one).
static JSON_PRINTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Prints `value` as pretty JSON on stdout: the command's one JSON document.
pub(crate) fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => {
            println!("{text}");
            JSON_PRINTED.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Err(e) => eprintln!("cannot print JSON: {e}"),
    }
}

/// Whether [`print_json`] has printed the command's document.
pub(crate) fn json_printed() -> bool {
    JSON_PRINTED.load(std::sync::atomic::Ordering::SeqCst)
}
