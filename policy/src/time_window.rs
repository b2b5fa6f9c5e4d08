//! Weekly time windows in a time zone.

use jiff::Timestamp;
use jiff::civil::Weekday as CivilWeekday;
use jiff::tz::TimeZone;
use sallyport_api::conditional_access_policy::{TimeWindow, Weekday};

use crate::compile::CompileError;

/// A [`TimeWindow`] ready to evaluate.
#[derive(Clone, Debug)]
pub(crate) struct CompiledWindow {
    /// Bit `n` set: the window opens on weekday `n` (Monday = 0). All set when no days
    /// are listed.
    days: u8,
    /// Start, minutes after midnight.
    from: u16,
    /// End, minutes after midnight (1440 for `24:00`). Before `from`: over midnight.
    to: u16,
    time_zone: TimeZone,
}

impl CompiledWindow {
    /// Compiles `window`, the `index`th of policy `policy`.
    pub fn new(policy: &str, index: usize, window: &TimeWindow) -> Result<Self, CompileError> {
        let field = |name: &str| format!("spec.conditions.times[{index}].{name}");
        let from = minutes(&window.from).ok_or_else(|| CompileError::Invalid {
            policy: policy.to_owned(),
            field: field("from"),
            message: format!("{:?} is not a time HH:MM", window.from),
        })?;
        let to = minutes(&window.to).ok_or_else(|| CompileError::Invalid {
            policy: policy.to_owned(),
            field: field("to"),
            message: format!("{:?} is not a time HH:MM", window.to),
        })?;
        let time_zone =
            TimeZone::get(&window.time_zone).map_err(|error| CompileError::Invalid {
                policy: policy.to_owned(),
                field: field("timeZone"),
                message: format!(
                    "{:?} is not a known IANA time zone: {error}",
                    window.time_zone
                ),
            })?;
        let days = if window.days.is_empty() {
            0x7f
        } else {
            window
                .days
                .iter()
                .fold(0u8, |bits, day| bits | 1 << day_index(*day))
        };
        Ok(Self {
            days,
            from,
            to,
            time_zone,
        })
    }

    /// Whether `now` falls in the window. A window over midnight belongs to the day it
    /// opens on: `Fri 22:00-06:00` covers Friday night into Saturday morning.
    pub fn contains(&self, now: Timestamp) -> bool {
        let local = self.time_zone.to_datetime(now);
        let minute =
            u16::from(local.hour().unsigned_abs()) * 60 + u16::from(local.minute().unsigned_abs());
        let today = civil_index(local.weekday());
        let open_on = |day: u8| self.days & (1 << day) != 0;
        if self.from < self.to {
            open_on(today) && self.from <= minute && minute < self.to
        } else {
            let yesterday = (today + 6) % 7;
            (open_on(today) && minute >= self.from) || (open_on(yesterday) && minute < self.to)
        }
    }
}

/// Minutes after midnight of `HH:MM` (`24:00` is 1440).
fn minutes(text: &str) -> Option<u16> {
    let (hours, mins) = text.split_once(':')?;
    let two_digits = |part: &str| part.len() == 2 && part.bytes().all(|b| b.is_ascii_digit());
    if !two_digits(hours) || !two_digits(mins) {
        return None;
    }
    let hours: u16 = hours.parse().ok()?;
    let mins: u16 = mins.parse().ok()?;
    match (hours, mins) {
        (24, 0) => Some(1440),
        (0..=23, 0..=59) => Some(hours * 60 + mins),
        _ => None,
    }
}

fn day_index(day: Weekday) -> u8 {
    match day {
        Weekday::Mon => 0,
        Weekday::Tue => 1,
        Weekday::Wed => 2,
        Weekday::Thu => 3,
        Weekday::Fri => 4,
        Weekday::Sat => 5,
        Weekday::Sun => 6,
    }
}

fn civil_index(day: CivilWeekday) -> u8 {
    day.to_monday_zero_offset().unsigned_abs()
}
