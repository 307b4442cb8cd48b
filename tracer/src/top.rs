//! `tracer top`: the busiest paths, live, in the terminal (as `linkerd viz top`): the tap stream
//! aggregated per (source, destination, method, path).

use std::{
    collections::HashMap,
    ops::ControlFlow,
    sync::mpsc,
    time::{Duration, Instant},
};

use crossterm::event::{self, Event as TermEvent, KeyCode, KeyModifiers};
use ratatui::{
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style, Stylize as _},
    text::Line,
    widgets::{Block, Cell, Paragraph, Row, Table},
};

use crate::{
    cli,
    tap::{Filter, TapEvent},
};

/// Distinct rows kept; requests on further paths are counted under `[other]`.
const MAX_ROWS: usize = 5000;
const REDRAW: Duration = Duration::from_millis(250);

#[derive(Debug)]
struct Stats {
    count: u64,
    successes: u64,
    best_ms: f64,
    worst_ms: f64,
    last_ms: f64,
}

type Key = (String, String, String, String);

enum Msg {
    Request(Box<TapEvent>),
    Dropped(u64),
    Failed(String),
}

#[derive(Default)]
struct PathTable {
    rows: HashMap<Key, Stats>,
    total: u64,
    dropped: u64,
}

impl PathTable {
    fn add(&mut self, e: TapEvent) {
        self.total += 1;
        let mut key = (e.src, e.dst, e.method, e.path);
        if !self.rows.contains_key(&key) && self.rows.len() >= MAX_ROWS {
            key.3 = crate::edges::OTHER.to_owned();
        }
        let s = self.rows.entry(key).or_insert(Stats {
            count: 0,
            successes: 0,
            best_ms: f64::MAX,
            worst_ms: 0.0,
            last_ms: 0.0,
        });
        s.count += 1;
        s.successes += u64::from(!e.failed);
        s.best_ms = s.best_ms.min(e.latency_ms);
        s.worst_ms = s.worst_ms.max(e.latency_ms);
        s.last_ms = e.latency_ms;
    }

    /// Busiest first.
    fn sorted(&self) -> Vec<(&Key, &Stats)> {
        let mut v: Vec<_> = self.rows.iter().collect();
        v.sort_by(|a, b| b.1.count.cmp(&a.1.count).then_with(|| a.0.cmp(b.0)));
        v
    }
}

fn fmt_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2}s", ms / 1000.0)
    } else if ms >= 1.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{:.0}µs", ms * 1000.0)
    }
}

pub fn run(addr: &str, filter: &Filter) -> anyhow::Result<()> {
    // Fail before taking over the terminal when no daemon answers.
    cli::check_daemon(addr)?;
    let (tx, rx) = mpsc::sync_channel::<Msg>(65_536);
    let path = format!("/api/tap?{}", filter.query());
    let addr_owned = addr.to_owned();
    std::thread::spawn(move || {
        let r = cli::events(&addr_owned, &path, |event, data| {
            let msg = match event {
                "request" => match serde_json::from_str::<TapEvent>(data) {
                    Ok(e) => Msg::Request(Box::new(e)),
                    Err(_) => return ControlFlow::Continue(()),
                },
                "dropped" => Msg::Dropped(
                    serde_json::from_str::<serde_json::Value>(data)
                        .ok()
                        .and_then(|v| v["dropped"].as_u64())
                        .unwrap_or(0),
                ),
                _ => return ControlFlow::Continue(()),
            };
            if tx.send(msg).is_err() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        if let Err(e) = r {
            let _ = tx.send(Msg::Failed(format!("{e:#}")));
        }
    });

    let mut terminal = ratatui::init();
    let mut table = PathTable::default();
    let mut failed: Option<String> = None;
    let result = loop {
        let deadline = Instant::now() + REDRAW;
        while let Ok(msg) = rx.try_recv() {
            match msg {
                Msg::Request(e) => table.add(*e),
                Msg::Dropped(n) => table.dropped += n,
                Msg::Failed(e) => failed = Some(e),
            }
        }
        if let Err(e) = terminal.draw(|f| draw(f, addr, &table, failed.as_deref())) {
            break Err(e.into());
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        match event::poll(wait) {
            Ok(true) => {
                if let Ok(TermEvent::Key(k)) = event::read() {
                    let ctrl_c =
                        k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if ctrl_c || matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) {
                        break Ok(());
                    }
                }
            }
            Ok(false) => {}
            Err(e) => break Err(e.into()),
        }
    };
    ratatui::restore();
    result
}

fn draw(f: &mut ratatui::Frame<'_>, addr: &str, table: &PathTable, failed: Option<&str>) {
    let [head, body] =
        Layout::vertical([Constraint::Length(2), Constraint::Min(1)]).areas(f.area());
    let mut status = format!(
        "tracer top · {addr} · {} requests · {} paths",
        table.total,
        table.rows.len()
    );
    if table.dropped > 0 {
        status.push_str(&format!(" · {} skipped (slow reader)", table.dropped));
    }
    let mut lines = vec![Line::from(status.bold())];
    lines.push(match failed {
        Some(e) => Line::from(format!("stream ended: {e}")).fg(Color::Red),
        None => Line::from("q to quit").dim(),
    });
    f.render_widget(Paragraph::new(lines), head);

    let header = Row::new(
        [
            "Source",
            "Destination",
            "Method",
            "Path",
            "Count",
            "Best",
            "Worst",
            "Last",
            "Success Rate",
        ]
        .map(|h| Cell::from(h).add_modifier(Modifier::BOLD)),
    );
    let rows = table.sorted().into_iter().take(body.height as usize).map(
        |((src, dst, method, path), s)| {
            let rate = s.successes as f64 / s.count.max(1) as f64;
            let colour = if rate >= 0.99 {
                Color::Green
            } else if rate >= 0.95 {
                Color::Yellow
            } else {
                Color::Red
            };
            Row::new(vec![
                Cell::from(src.as_str()),
                Cell::from(dst.as_str()),
                Cell::from(method.as_str()),
                Cell::from(path.as_str()),
                Cell::from(s.count.to_string()),
                Cell::from(fmt_ms(s.best_ms)),
                Cell::from(fmt_ms(s.worst_ms)),
                Cell::from(fmt_ms(s.last_ms)),
                Cell::from(format!("{:.2}%", rate * 100.0)).style(Style::default().fg(colour)),
            ])
        },
    );
    let widths = [
        Constraint::Percentage(12),
        Constraint::Percentage(12),
        Constraint::Length(7),
        Constraint::Fill(1),
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(12),
    ];
    f.render_widget(
        Table::new(rows, widths)
            .header(header)
            .block(Block::default()),
        body,
    );
}
