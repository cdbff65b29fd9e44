//! A small line editor for raw-mode terminals: one input line under the output, which
//! scrolls sideways when it is wider than the terminal, with the usual Emacs-style keys
//! and a history of the lines entered. Pure: keys in, text to write out.

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use unicode_width::UnicodeWidthChar;

/// Lines kept for Up/Down; the oldest is dropped beyond it.
pub const HISTORY_LINES_MAX: usize = 1000;

/// What a key did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Edit {
    /// Nothing to do.
    None,
    /// The cursor moved: redraw.
    Moved,
    /// The text changed: redraw (the user is typing).
    Changed,
    /// Enter: the line, now taken out of the editor.
    Line(String),
    /// Ctrl-D on an empty line.
    Eof,
    /// Ctrl-C on an empty line.
    Interrupt,
    /// Ctrl-L: clear the screen and redraw.
    ClearScreen,
}

/// The line being edited.
#[derive(Clone, Debug, Default)]
pub struct Editor {
    buf: Vec<char>,
    cursor: usize,
    /// First char shown when the line is wider than the space for it.
    scroll: usize,
    history: Vec<String>,
    /// Position in `history` while browsing it, and the line that was being typed.
    browsing: Option<(usize, Vec<char>)>,
}

fn width(c: char) -> usize {
    c.width().unwrap_or(0)
}

fn str_width(s: &str) -> usize {
    s.chars().map(width).sum()
}

impl Editor {
    /// An empty editor.
    pub fn new() -> Self {
        Editor::default()
    }

    /// The text typed so far.
    pub fn text(&self) -> String {
        self.buf.iter().collect()
    }

    /// Whether nothing is typed.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn set(&mut self, chars: Vec<char>) {
        self.cursor = chars.len();
        self.buf = chars;
    }

    /// Applies one key.
    pub fn key(&mut self, key: KeyEvent) -> Edit {
        if !matches!(key.kind, KeyEventKind::Press | KeyEventKind::Repeat) {
            return Edit::None;
        }
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        let alt = key.modifiers.contains(KeyModifiers::ALT);
        match key.code {
            KeyCode::Enter => self.enter(),
            KeyCode::Char('j' | 'm') if ctrl => self.enter(),
            KeyCode::Char('c') if ctrl => {
                if self.buf.is_empty() {
                    Edit::Interrupt
                } else {
                    self.set(Vec::new());
                    Edit::Changed
                }
            }
            KeyCode::Char('d') if ctrl => {
                if self.buf.is_empty() {
                    Edit::Eof
                } else {
                    self.delete()
                }
            }
            KeyCode::Char('a') if ctrl => self.move_to(0),
            KeyCode::Char('e') if ctrl => self.move_to(self.buf.len()),
            KeyCode::Char('b') if ctrl => self.move_to(self.cursor.saturating_sub(1)),
            KeyCode::Char('f') if ctrl => self.move_to(self.cursor + 1),
            KeyCode::Char('u') if ctrl => {
                self.buf.drain(..self.cursor);
                self.cursor = 0;
                Edit::Changed
            }
            KeyCode::Char('k') if ctrl => {
                self.buf.truncate(self.cursor);
                Edit::Changed
            }
            KeyCode::Char('w') if ctrl => self.delete_word_back(),
            KeyCode::Backspace if alt => self.delete_word_back(),
            KeyCode::Char('h') if ctrl => self.backspace(),
            KeyCode::Char('l') if ctrl => Edit::ClearScreen,
            KeyCode::Char('p') if ctrl => self.history_prev(),
            KeyCode::Char('n') if ctrl => self.history_next(),
            KeyCode::Char(_) if ctrl || alt => Edit::None,
            KeyCode::Char(c) => {
                self.buf.insert(self.cursor, c);
                self.cursor += 1;
                Edit::Changed
            }
            KeyCode::Tab => {
                self.buf.insert(self.cursor, ' ');
                self.cursor += 1;
                Edit::Changed
            }
            KeyCode::Backspace => self.backspace(),
            KeyCode::Delete => self.delete(),
            KeyCode::Left => self.move_to(self.cursor.saturating_sub(1)),
            KeyCode::Right => self.move_to(self.cursor + 1),
            KeyCode::Home => self.move_to(0),
            KeyCode::End => self.move_to(self.buf.len()),
            KeyCode::Up => self.history_prev(),
            KeyCode::Down => self.history_next(),
            _ => Edit::None,
        }
    }

    fn enter(&mut self) -> Edit {
        let line = self.text();
        self.set(Vec::new());
        self.scroll = 0;
        self.browsing = None;
        if !line.trim().is_empty() && self.history.last() != Some(&line) {
            if self.history.len() >= HISTORY_LINES_MAX {
                self.history.remove(0);
            }
            self.history.push(line.clone());
        }
        Edit::Line(line)
    }

    fn move_to(&mut self, pos: usize) -> Edit {
        let pos = pos.min(self.buf.len());
        if pos == self.cursor {
            return Edit::None;
        }
        self.cursor = pos;
        Edit::Moved
    }

    fn backspace(&mut self) -> Edit {
        if self.cursor == 0 {
            return Edit::None;
        }
        self.cursor -= 1;
        self.buf.remove(self.cursor);
        Edit::Changed
    }

    fn delete(&mut self) -> Edit {
        if self.cursor >= self.buf.len() {
            return Edit::None;
        }
        self.buf.remove(self.cursor);
        Edit::Changed
    }

    fn delete_word_back(&mut self) -> Edit {
        let mut start = self.cursor;
        while start > 0 && self.buf[start - 1].is_whitespace() {
            start -= 1;
        }
        while start > 0 && !self.buf[start - 1].is_whitespace() {
            start -= 1;
        }
        if start == self.cursor {
            return Edit::None;
        }
        self.buf.drain(start..self.cursor);
        self.cursor = start;
        Edit::Changed
    }

    fn history_prev(&mut self) -> Edit {
        let next = match &self.browsing {
            None if self.history.is_empty() => return Edit::None,
            None => {
                self.browsing = Some((self.history.len() - 1, self.buf.clone()));
                self.history.len() - 1
            }
            Some((0, _)) => return Edit::None,
            Some((i, _)) => i - 1,
        };
        if let Some((i, _)) = &mut self.browsing {
            *i = next;
        }
        let line: Vec<char> = self.history[next].chars().collect();
        self.set(line);
        Edit::Moved
    }

    fn history_next(&mut self) -> Edit {
        let Some((i, saved)) = self.browsing.take() else {
            return Edit::None;
        };
        if i + 1 < self.history.len() {
            self.browsing = Some((i + 1, saved));
            let line: Vec<char> = self.history[i + 1].chars().collect();
            self.set(line);
        } else {
            self.set(saved);
        }
        Edit::Moved
    }

    /// The bytes that redraw the input line: back to column 0, clear the line, the
    /// prompt and the visible part of the text, then the cursor in place. `columns` is
    /// the terminal's width.
    pub fn render(&mut self, prompt: &str, columns: usize) -> String {
        let columns = columns.max(8);
        // Keep the prompt to at most half the line.
        let mut shown_prompt = String::new();
        let mut prompt_width = 0;
        for c in prompt.chars() {
            let w = width(c);
            if prompt_width + w > columns / 2 {
                break;
            }
            shown_prompt.push(c);
            prompt_width += w;
        }
        // One column is kept free so the cursor never wraps.
        let room = columns.saturating_sub(prompt_width + 1).max(1);
        if self.cursor < self.scroll {
            self.scroll = self.cursor;
        }
        while self.scroll < self.cursor
            && self.buf[self.scroll..self.cursor]
                .iter()
                .map(|c| width(*c))
                .sum::<usize>()
                >= room
        {
            self.scroll += 1;
        }
        let mut visible = String::new();
        let mut used = 0;
        let mut cursor_col = prompt_width;
        for (i, c) in self.buf.iter().enumerate().skip(self.scroll) {
            let w = width(*c);
            if used + w > room {
                break;
            }
            if i < self.cursor {
                cursor_col += w;
            }
            visible.push(if c.is_control() { '\u{fffd}' } else { *c });
            used += w;
        }
        let mut out = format!("\r\x1b[2K{shown_prompt}{visible}\r");
        if cursor_col > 0 {
            out.push_str(&format!("\x1b[{cursor_col}C"));
        }
        out
    }
}

/// The display width of a string (for prompts).
pub fn display_width(s: &str) -> usize {
    str_width(s)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn ctrl(c: char) -> KeyEvent {
        KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL)
    }

    fn typed(e: &mut Editor, s: &str) {
        for c in s.chars() {
            assert_eq!(e.key(key(KeyCode::Char(c))), Edit::Changed);
        }
    }

    #[test]
    fn editing_keys() {
        let mut e = Editor::new();
        typed(&mut e, "hello world");
        assert_eq!(e.key(ctrl('w')), Edit::Changed);
        assert_eq!(e.text(), "hello ");
        assert_eq!(e.key(key(KeyCode::Home)), Edit::Moved);
        typed(&mut e, ">");
        assert_eq!(e.text(), ">hello ");
        assert_eq!(e.key(ctrl('k')), Edit::Changed);
        assert_eq!(e.text(), ">");
        // Ctrl-K left the cursor at the end already.
        assert_eq!(e.key(key(KeyCode::End)), Edit::None);
        assert_eq!(e.key(key(KeyCode::Backspace)), Edit::Changed);
        assert!(e.is_empty());
        assert_eq!(e.key(ctrl('d')), Edit::Eof);
        assert_eq!(e.key(ctrl('c')), Edit::Interrupt);
        typed(&mut e, "one");
        assert_eq!(e.key(key(KeyCode::Enter)), Edit::Line("one".into()));
        typed(&mut e, "two");
        assert_eq!(e.key(ctrl('m')), Edit::Line("two".into()));
        typed(&mut e, "dra");
        assert_eq!(e.key(key(KeyCode::Up)), Edit::Moved);
        assert_eq!(e.text(), "two");
        assert_eq!(e.key(key(KeyCode::Up)), Edit::Moved);
        assert_eq!(e.text(), "one");
        assert_eq!(e.key(key(KeyCode::Down)), Edit::Moved);
        assert_eq!(e.key(key(KeyCode::Down)), Edit::Moved);
        assert_eq!(e.text(), "dra");
        assert_eq!(e.key(ctrl('c')), Edit::Changed);
        assert!(e.is_empty());
    }

    #[test]
    fn history_is_bounded() {
        let mut e = Editor::new();
        for i in 0..HISTORY_LINES_MAX + 5 {
            typed(&mut e, &format!("l{i}"));
            assert_eq!(e.key(key(KeyCode::Enter)), Edit::Line(format!("l{i}")));
        }
        assert_eq!(e.history.len(), HISTORY_LINES_MAX);
        for _ in 0..HISTORY_LINES_MAX + 10 {
            e.key(key(KeyCode::Up));
        }
        // The oldest five are gone.
        assert_eq!(e.text(), "l5");
    }

    #[test]
    fn rendering_scrolls_sideways() {
        let mut e = Editor::new();
        typed(&mut e, "abc");
        assert_eq!(e.render("> ", 80), "\r\x1b[2K> abc\r\x1b[5C");
        let mut e = Editor::new();
        typed(&mut e, "0123456789abcdefghij");
        // 20 columns: prompt 2, room 17: the cursor at the end shows the last 16 chars.
        let out = e.render("> ", 20);
        assert_eq!(out, "\r\x1b[2K> 456789abcdefghij\r\x1b[18C");
        e.key(key(KeyCode::Home));
        assert_eq!(e.render("> ", 20), "\r\x1b[2K> 0123456789abcdefg\r\x1b[2C");
        // Wide characters count twice.
        let mut e = Editor::new();
        typed(&mut e, "日本");
        assert_eq!(e.render("", 80), "\r\x1b[2K日本\r\x1b[4C");
        assert_eq!(display_width("日本 x"), 6);
    }
}
