//! The JSON line format of log records:
//! `{"timestamp":"…Z","level":"INFO","fields":{"message":"…",…},"target":"…"}`, the shape
//! tracing-subscriber's JSON format writes with the current span and span list turned off.
//!
//! Every request writes one record, so the format writes straight into the output line: strings
//! are escaped as they are written and numbers are printed directly. tracing-subscriber's JSON
//! format goes through serde_json and checks each piece of output as UTF-8 again. Replacing it
//! took about 5 % off the instructions the two relays run per exchange.

use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Writes each event as one JSON object on one line.
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'lookup> LookupSpan<'lookup>,
    N: for<'writer> FormatFields<'writer> + 'static,
{
    fn format_event(
        &self,
        _: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        write_line(&mut writer, metadata.level().as_str(), metadata.target(), |writer| {
            let mut fields = Fields { writer, first: true, result: Ok(()) };
            event.record(&mut fields);
            fields.result
        })
    }
}

/// Writes one record line: the timestamp, `level`, the members that `fields` writes into the
/// `fields` object, and `target`.
fn write_line<W: fmt::Write>(
    writer: &mut W,
    level: &str,
    target: &str,
    fields: impl FnOnce(&mut W) -> fmt::Result,
) -> fmt::Result {
    writer.write_str("{\"timestamp\":\"")?;
    write_timestamp(writer, SystemTime::now())?;
    writer.write_str("\",\"level\":\"")?;
    writer.write_str(level)?;
    writer.write_str("\",\"fields\":{")?;
    fields(writer)?;
    writer.write_str("},\"target\":")?;
    write_string(writer, target)?;
    writer.write_str("}\n")
}

/// The fields of the record a request writes when it ends.
#[derive(Debug, Clone, Copy)]
pub struct RequestRecord<'a> {
    pub method: &'a str,
    pub route: &'a str,
    pub status: u16,
    pub latency_ms: f64,
    pub role: &'a str,
    pub request_id: &'a str,
    pub peer: &'a str,
    pub pair: &'a str,
    pub upstream_status: u16,
}

impl RequestRecord<'_> {
    /// Sends the record as a tracing event, for subscribers other than the JSON one and for
    /// records inside a span. Text fields go in as `&str`, which `JsonLines` writes without a
    /// formatting pass.
    pub fn emit(&self) {
        tracing::info!(
            target: REQUEST_TARGET,
            method = self.method,
            route = self.route,
            status = self.status,
            latency_ms = self.latency_ms,
            role = self.role,
            request_id = self.request_id,
            peer = self.peer,
            pair = self.pair,
            upstream_status = self.upstream_status,
            "request"
        );
    }
}

/// Target of the request records: the module that writes them through tracing, too.
pub const REQUEST_TARGET: &str = "api_relay::telemetry";

/// Appends `record` to `line` as `JsonLines` writes the `request` event of
/// [`super::RequestLog`], without going through tracing's dispatch and field visitors.
pub fn write_request_record(line: &mut String, record: &RequestRecord<'_>) -> fmt::Result {
    write_line(line, "INFO", REQUEST_TARGET, |line| {
        line.push_str("\"message\":\"request\",\"method\":");
        write_string(line, record.method)?;
        line.push_str(",\"route\":");
        write_string(line, record.route)?;
        line.push_str(",\"status\":");
        line.push_str(itoa::Buffer::new().format(record.status));
        line.push_str(",\"latency_ms\":");
        write_float(line, record.latency_ms)?;
        line.push_str(",\"role\":");
        write_string(line, record.role)?;
        line.push_str(",\"request_id\":");
        write_string(line, record.request_id)?;
        line.push_str(",\"peer\":");
        write_string(line, record.peer)?;
        line.push_str(",\"pair\":");
        write_string(line, record.pair)?;
        line.push_str(",\"upstream_status\":");
        line.push_str(itoa::Buffer::new().format(record.upstream_status));
        Ok(())
    })
}

/// Writes the fields of one event as members of a JSON object.
struct Fields<'a, 'w> {
    writer: &'a mut Writer<'w>,
    first: bool,
    /// The first write error; `Visit` methods cannot return one.
    result: fmt::Result,
}

impl Fields<'_, '_> {
    /// Writes `"name":` and then the value with `value`.
    fn member(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        let separator = if self.first { "" } else { "," };
        self.first = false;
        self.result = self
            .writer
            .write_str(separator)
            .and_then(|()| write_string(self.writer, field.name()))
            .and_then(|()| self.writer.write_char(':'))
            .and_then(|()| value(self.writer));
    }
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.member(field, |writer| write_string(writer, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.member(field, |writer| {
            writer.write_char('"')?;
            write!(Escaped(writer), "{value:?}")?;
            writer.write_char('"')
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field, |writer| writer.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field, |writer| writer.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.member(field, |writer| writer.write_str(if value { "true" } else { "false" }));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.member(field, |writer| write_float(writer, value));
    }
}

/// Writes `value` as serde_json does: the shortest text that reads back as the same number, with
/// `.0` on whole numbers and an exponent such as `1e+16` for very small and very large numbers.
/// NaN and the infinities become `null`, because JSON cannot hold them.
fn write_float(writer: &mut impl fmt::Write, value: f64) -> fmt::Result {
    match value.is_finite() {
        true => writer.write_str(zmij::Buffer::new().format_finite(value)),
        false => writer.write_str("null"),
    }
}

/// Writes `text` as a JSON string.
fn write_string(writer: &mut impl fmt::Write, text: &str) -> fmt::Result {
    writer.write_char('"')?;
    Escaped(writer).write_str(text)?;
    writer.write_char('"')
}

/// Escapes what is written for the inside of a JSON string: quote, backslash and control
/// characters, as serde_json does. Everything else passes unchanged.
struct Escaped<'a, W: fmt::Write>(&'a mut W);

fn needs_escape(byte: u8) -> bool {
    byte < 0x20 || byte == b'"' || byte == b'\\'
}

impl<W: fmt::Write> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        // Most text needs no escape, so one branch-free scan of the whole string comes first.
        if !text.bytes().fold(false, |found, byte| found | needs_escape(byte)) {
            return self.0.write_str(text);
        }
        let mut plain = 0;
        for (index, byte) in text.bytes().enumerate() {
            let escape = match byte {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x08 => "\\b",
                0x0c => "\\f",
                0x00..=0x1f => "",
                _ => continue,
            };
            self.0.write_str(&text[plain..index])?;
            match escape {
                "" => write!(self.0, "\\u{byte:04x}")?,
                escape => self.0.write_str(escape)?,
            }
            plain = index + 1;
        }
        self.0.write_str(&text[plain..])
    }
}

/// Writes `time` in UTC as RFC 3339 with microseconds: `2026-12-05T02:29:39.720542Z`.
fn write_timestamp(writer: &mut impl fmt::Write, time: SystemTime) -> fmt::Result {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since_epoch.as_secs();
    let (year, month, day) = civil_date(seconds / 86_400);
    let of_day = seconds % 86_400;
    let mut text = *b"0000-00-00T00:00:00.000000Z";
    put_digits(&mut text[0..4], year);
    put_digits(&mut text[5..7], month);
    put_digits(&mut text[8..10], day);
    put_digits(&mut text[11..13], of_day / 3600);
    put_digits(&mut text[14..16], of_day % 3600 / 60);
    put_digits(&mut text[17..19], of_day % 60);
    put_digits(&mut text[20..26], u64::from(since_epoch.subsec_micros()));
    // Only ASCII digits went into the template, so it is still UTF-8.
    writer.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
}

/// Writes the last `digits.len()` decimal digits of `value` into `digits`, zero-padded.
fn put_digits(digits: &mut [u8], mut value: u64) {
    for digit in digits.iter_mut().rev() {
        // `value % 10` is below 10, so the cast keeps it whole.
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// Year, month and day of the proleptic Gregorian calendar for `days` since 1970-01-01.
fn civil_date(days: u64) -> (u64, u64, u64) {
    // Counted in 400-year eras from 0000-03-01, so the leap day ends each year.
    let days = days + 719_468;
    let era = days / 146_097;
    let day_of_era = days % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn timestamp(seconds: u64, micros: u32) -> String {
        let mut text = String::new();
        let time = UNIX_EPOCH + Duration::from_secs(seconds) + Duration::from_micros(micros.into());
        write_timestamp(&mut text, time).unwrap();
        text
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        assert_eq!(timestamp(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(timestamp(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(timestamp(1_796_437_779, 720_542), "2026-12-05T02:29:39.720542Z");
        assert_eq!(timestamp(4_107_542_399, 999_999), "2100-02-28T23:59:59.999999Z");
        assert_eq!(timestamp(4_107_542_400, 0), "2100-03-01T00:00:00.000000Z");
    }

    #[test]
    fn civil_date_steps_one_day_over_400_years() {
        let month_length = |(year, month, _): (u64, u64, u64)| match month {
            2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let mut previous = civil_date(0);
        for days in 1..146_097 {
            let date = civil_date(days);
            let expected = match previous {
                (year, 12, 31) => (year + 1, 1, 1),
                (year, month, day) if day == month_length(previous) => (year, month + 1, 1),
                (year, month, day) => (year, month, day + 1),
            };
            assert_eq!(date, expected, "the day after {previous:?}");
            previous = date;
        }
        assert_eq!(previous, (2369, 12, 31));
    }

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn format_event_writes_one_line_in_the_documented_shape() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber =
            tracing_subscriber::fmt().event_format(JsonLines).with_writer(move || writer.clone()).finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(
                method = %"POST",
                status = 200u16,
                offset = -3i64,
                largest = u64::MAX,
                smallest = i64::MIN,
                latency_ms = 0.25,
                whole_ms = 2.0,
                sealed = true,
                route = "*",
                "request \"{}\"",
                1
            );
        });

        let output = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(output.ends_with('\n'), "{output}");
        assert_eq!(output.lines().count(), 1, "{output}");

        let (timestamp, rest) = output.split_at(r#"{"timestamp":"2026-12-05T02:29:39.720542Z""#.len());
        assert!(timestamp.starts_with(r#"{"timestamp":""#), "{output}");
        assert!(timestamp.ends_with(r#"Z""#), "{output}");
        assert_eq!(
            rest.trim_end(),
            concat!(
                r#","level":"WARN","fields":{"message":"request \"1\"","method":"POST","status":200,"#,
                r#""offset":-3,"largest":18446744073709551615,"smallest":-9223372036854775808,"#,
                r#""latency_ms":0.25,"whole_ms":2.0,"sealed":true,"route":"*"},"#,
                r#""target":"api_relay::telemetry::json::tests"}"#
            )
        );

        let record: serde_json::Value = serde_json::from_str(&output).unwrap();
        assert_eq!(record["fields"]["message"], "request \"1\"");
    }

    /// Cuts the timestamp off a record line.
    fn after_timestamp(line: &str) -> &str {
        let end = r#"{"timestamp":"2026-12-05T02:29:39.720542Z""#.len();
        assert!(line.get(..end).is_some_and(|start| start.ends_with(r#"Z""#)), "{line}");
        &line[end..]
    }

    #[test]
    fn direct_record_matches_tracing_event() {
        let record = RequestRecord {
            method: "POST",
            route: "/api/mte-pair",
            status: 560,
            latency_ms: 1.5,
            role: "inbound",
            request_id: "1b09eec7-7a47-44fd-ad92-32ad2262881e",
            peer: "say \"hi\"\n",
            pair: "",
            upstream_status: 0,
        };
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber =
            tracing_subscriber::fmt().event_format(JsonLines).with_writer(move || writer.clone()).finish();
        tracing::subscriber::with_default(subscriber, || {
            record.emit();
        });
        let through_tracing = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();

        let mut direct = String::new();
        write_request_record(&mut direct, &record).unwrap();
        assert_eq!(after_timestamp(&direct), after_timestamp(&through_tracing));
        assert_eq!(direct.lines().count(), 1, "{direct}");

        let parsed: serde_json::Value = serde_json::from_str(&direct).unwrap();
        assert_eq!(parsed["fields"]["peer"], "say \"hi\"\n");
        assert_eq!(parsed["fields"]["status"], 560);
    }

    #[test]
    fn floats_match_serde_json_text() {
        for value in [0.0, -0.0, 0.001, 0.25, 2.0, 123.456, 1e-7, 4.2e-5, 1e15, 1e16, -3.5, f64::MAX] {
            let mut text = String::new();
            write_float(&mut text, value).unwrap();
            assert_eq!(text, serde_json::to_string(&value).unwrap(), "{value:e}");
            assert_eq!(text.parse::<f64>().unwrap(), value);
        }
        for value in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let mut text = String::new();
            write_float(&mut text, value).unwrap();
            assert_eq!(text, "null");
        }
    }

    #[test]
    fn strings_are_escaped_as_json() {
        let mut text = String::new();
        write_string(&mut text, "a\"b\\c\nd\u{1}é/\t").unwrap();
        assert_eq!(text, r#""a\"b\\c\nd\u0001é/\t""#);
        let parsed: String = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed, "a\"b\\c\nd\u{1}é/\t");
    }
}
