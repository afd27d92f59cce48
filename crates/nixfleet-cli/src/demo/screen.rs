//! What the demo prints: section titles, lines, fleet tables and a spinner for waits.
//! Colour and the spinner only on a terminal; at most 100 columns.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use crate::operator::render::{self, Style};

/// The widest the demo draws, whatever the terminal.
const MAX_WIDTH: usize = 100;

pub struct Screen {
    pub style: Style,
    tty: bool,
    bar: Option<indicatif::ProgressBar>,
}

impl Screen {
    pub fn new() -> Screen {
        let tty = std::io::stdout().is_terminal();
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
        let width = if tty {
            console::Term::stdout()
                .size_checked()
                .map_or(80, |(_, cols)| usize::from(cols))
        } else {
            80
        };
        Screen {
            style: Style {
                width: width.clamp(40, MAX_WIDTH),
                colour: tty && !no_color && !dumb,
            },
            tty: tty && !dumb,
            bar: None,
        }
    }

    pub fn is_tty(&self) -> bool {
        self.tty
    }

    /// Prints lines above the spinner, if one is showing.
    pub fn say(&self, text: &str) {
        let width = self.style.width;
        let lines: Vec<String> = text
            .lines()
            .flat_map(|l| {
                // Tables are already laid out (and may hold colour codes).
                if l.contains('\x1b') {
                    vec![l.to_owned()]
                } else {
                    wrap(l, width)
                }
            })
            .collect();
        let print = || {
            let mut out = std::io::stdout().lock();
            for l in &lines {
                let _ = writeln!(out, "{l}");
            }
            let _ = out.flush();
        };
        match &self.bar {
            Some(bar) => bar.suspend(print),
            None => print(),
        }
    }

    pub fn title(&self, text: &str) {
        self.say("");
        self.say(&render::bold(&format!("== {text}"), &self.style));
    }

    /// Shows a spinner with `message` (terminal only); replaces any previous one.
    pub fn wait(&mut self, message: &str) {
        if !self.tty {
            return;
        }
        let message = render::elide(message, self.style.width.saturating_sub(3));
        match &self.bar {
            Some(bar) => bar.set_message(message),
            None => {
                let bar = indicatif::ProgressBar::with_draw_target(
                    None,
                    indicatif::ProgressDrawTarget::stdout(),
                );
                bar.set_style(indicatif::ProgressStyle::default_spinner());
                bar.set_message(message);
                bar.enable_steady_tick(Duration::from_millis(120));
                self.bar = Some(bar);
            }
        }
    }

    pub fn done_waiting(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// `line` word-wrapped to `width`; continuation lines are indented two more spaces than
/// the first, and a word too long for a line is cut in the middle.
fn wrap(line: &str, width: usize) -> Vec<String> {
    if line.chars().count() <= width {
        return vec![line.to_owned()];
    }
    let indent = line.len() - line.trim_start().len();
    let rest = " ".repeat(indent + 2);
    let mut out = Vec::new();
    let mut current = " ".repeat(indent);
    let mut empty = true;
    for word in line.split_whitespace() {
        let word = render::elide_middle(word, width.saturating_sub(indent + 2));
        if !empty && current.chars().count() + 1 + word.chars().count() > width {
            out.push(std::mem::replace(&mut current, rest.clone()));
            empty = true;
        }
        if !empty {
            current.push(' ');
        }
        current.push_str(&word);
        empty = false;
    }
    out.push(current);
    out
}

impl Drop for Screen {
    fn drop(&mut self) {
        self.done_waiting();
    }
}
