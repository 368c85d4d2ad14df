//! flsl-firmware on a Cortex-M4F: qemu's `mps2-an386` board (thumbv7em-none-eabihf).
//!
//! The image replays a link byte stream through the firmware's [`flsl_firmware::Follower`]:
//!
//! 1. UART0 (CMSDK APB UART at `0x4000_4000`) first receives the stream length as ASCII
//!    decimal digits and a `\n`, then the stream itself: plain bytes of link wire frames as
//!    recorded (see `harness` for the byte clock that paces them).
//! 2. [`harness::run`] feeds them to the follower, whose pan/tilt PWM channels and alert pin
//!    are recording embedded-hal 1.0 implementations, and writes a report line per event
//!    and per 100 ms of virtual time to UART1 (`0x4000_5000`).
//! 3. At the end of the stream the image reports the deepest stack use (the stack is
//!    painted at boot) in a `#` line and exits through semihosting: 0 when the whole stream
//!    was replayed, 1 otherwise.
//!
//! Board-only lines start with `#`; every other line is also produced by the host model
//! (`firmware/tests/board_stream.rs`) and must match it. `scripts/firmware-qemu.sh` builds,
//! boots and compares.
#![no_std]
#![no_main]

mod harness;

use core::arch::asm;
use core::fmt;
use core::ptr::{addr_of, read_volatile, write_volatile};

use cortex_m::peripheral::SYST;
use cortex_m::peripheral::syst::SystClkSource;
use cortex_m_rt::{ExceptionFrame, entry, exception};
use cortex_m_semihosting::debug::{self, EXIT_FAILURE, EXIT_SUCCESS};
use embedded_io::{ErrorType, Read, ReadReady, Write};

/// Core clock of the MPS2 FPGA images (SysTick counts it).
const SYSCLK_HZ: u32 = 25_000_000;

/// Base addresses of the CMSDK APB UARTs used.
const UART0_BASE: usize = 0x4000_4000;
const UART1_BASE: usize = 0x4000_5000;

/// A due byte that has not arrived after this much emulated time means the feed broke.
const RX_TIMEOUT_S: u32 = 10;

/// Longest accepted stream (digits of the length header): 1 GB.
const MAX_STREAM_LEN: u32 = 1_000_000_000;

/// The stack is painted with this word at boot.
const STACK_PAINT: u32 = 0xF15A_C0DE;

/// Elapsed SysTick ticks, robust to the 24-bit counter wrapping between polls.
struct Elapsed {
    last: u32,
    ticks: u64,
}

impl Elapsed {
    fn start() -> Self {
        Self { last: SYST::get_current(), ticks: 0 }
    }

    /// Ticks since `start`; must be polled at least once per counter period (0.67 s).
    fn poll(&mut self) -> u64 {
        let now = SYST::get_current();
        // SysTick counts down.
        self.ticks =
            self.ticks.saturating_add(u64::from(self.last.wrapping_sub(now) & 0x00FF_FFFF));
        self.last = now;
        self.ticks
    }
}

/// A UART error: a byte did not arrive in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Timeout;

impl fmt::Display for Timeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UART receive timed out")
    }
}

impl core::error::Error for Timeout {}

impl embedded_io::Error for Timeout {
    fn kind(&self) -> embedded_io::ErrorKind {
        embedded_io::ErrorKind::TimedOut
    }
}

/// A CMSDK APB UART (ARM DDI 0479): polled, no interrupts.
struct Uart {
    base: usize,
    rx_timeout_ticks: u64,
}

impl Uart {
    const DATA: usize = 0x00;
    const STATE: usize = 0x04;
    const CTRL: usize = 0x08;
    const BAUDDIV: usize = 0x10;
    const STATE_TX_FULL: u32 = 1 << 0;
    const STATE_RX_FULL: u32 = 1 << 1;
    const CTRL_TX_EN: u32 = 1 << 0;
    const CTRL_RX_EN: u32 = 1 << 1;

    /// Enables the UART at `base` at `baud`.
    ///
    /// # Safety
    ///
    /// `base` must be a CMSDK APB UART that nothing else drives.
    unsafe fn new(base: usize, baud: u32) -> Self {
        let uart = Self { base, rx_timeout_ticks: u64::from(RX_TIMEOUT_S) * u64::from(SYSCLK_HZ) };
        uart.write_reg(Self::BAUDDIV, (SYSCLK_HZ / baud).max(16));
        uart.write_reg(Self::CTRL, Self::CTRL_TX_EN | Self::CTRL_RX_EN);
        uart
    }

    fn read_reg(&self, offset: usize) -> u32 {
        // SAFETY: a register of the UART this handle owns (`new`'s contract).
        unsafe { read_volatile((self.base + offset) as *const u32) }
    }

    fn write_reg(&self, offset: usize, value: u32) {
        // SAFETY: a register of the UART this handle owns (`new`'s contract).
        unsafe { write_volatile((self.base + offset) as *mut u32, value) }
    }

    fn rx_full(&self) -> bool {
        self.read_reg(Self::STATE) & Self::STATE_RX_FULL != 0
    }

    /// Waits for a received byte, at most the RX timeout.
    fn wait_rx(&self) -> Result<(), Timeout> {
        let mut elapsed = Elapsed::start();
        while !self.rx_full() {
            if elapsed.poll() > self.rx_timeout_ticks {
                return Err(Timeout);
            }
        }
        Ok(())
    }

    fn take_byte(&self) -> u8 {
        // Reading DATA clears RX full; the data is the low byte.
        (self.read_reg(Self::DATA) & 0xFF) as u8
    }
}

impl ErrorType for Uart {
    type Error = Timeout;
}

impl Read for Uart {
    /// Waits for the first byte (at most the RX timeout), then takes the ones already there.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Timeout> {
        let mut n = 0;
        for slot in buf.iter_mut() {
            if n == 0 {
                self.wait_rx()?;
            } else if !self.rx_full() {
                break;
            }
            *slot = self.take_byte();
            n += 1;
        }
        Ok(n)
    }
}

impl ReadReady for Uart {
    fn read_ready(&mut self) -> Result<bool, Timeout> {
        Ok(self.rx_full())
    }
}

impl Write for Uart {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Timeout> {
        for &byte in buf {
            while self.read_reg(Self::STATE) & Self::STATE_TX_FULL != 0 {}
            self.write_reg(Self::DATA, u32::from(byte));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> Result<(), Timeout> {
        while self.read_reg(Self::STATE) & Self::STATE_TX_FULL != 0 {}
        Ok(())
    }
}

/// `core::fmt` on an embedded-io writer (the report).
struct Report<'a, W>(&'a mut W);

impl<W: Write> fmt::Write for Report<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.write_all(s.as_bytes()).map_err(|_| fmt::Error)
    }
}

/// The first `remaining` bytes of a reader, then its end (`Ok(0)`).
struct Take<R> {
    inner: R,
    remaining: u32,
}

impl<R: ErrorType> ErrorType for Take<R> {
    type Error = R::Error;
}

impl<R: Read> Read for Take<R> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, R::Error> {
        let max = usize::try_from(self.remaining).unwrap_or(usize::MAX);
        let dst = buf.get_mut(..max.min(buf.len())).unwrap_or_default();
        if dst.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(dst)?;
        self.remaining = self.remaining.saturating_sub(u32::try_from(n).unwrap_or(u32::MAX));
        Ok(n)
    }
}

/// Reads the stream length header: ASCII decimal digits, then `\n`.
fn read_length(uart: &mut Uart) -> Option<u32> {
    let mut len: u32 = 0;
    let mut digits = false;
    loop {
        let mut byte = [0u8];
        match uart.read(&mut byte) {
            Ok(1) => {}
            _ => return None,
        }
        match byte[0] {
            b'\n' if digits => return Some(len),
            d @ b'0'..=b'9' => {
                len = len.checked_mul(10)?.checked_add(u32::from(d - b'0'))?;
                if len > MAX_STREAM_LEN {
                    return None;
                }
                digits = true;
            }
            b'\r' => {}
            _ => return None,
        }
    }
}

unsafe extern "C" {
    /// Top of the stack (cortex-m-rt's `link.x`): the initial SP.
    static _stack_start: u32;
    /// Bottom of the stack region (end of `.bss`/`.uninit`).
    static _stack_end: u32;
}

fn stack_bounds() -> (usize, usize) {
    (addr_of!(_stack_end) as usize, addr_of!(_stack_start) as usize)
}

/// Fills the unused stack below the current frame with [`STACK_PAINT`].
#[inline(never)]
fn paint_stack() {
    let sp: usize;
    // SAFETY: reads SP into a register; no memory access.
    unsafe { asm!("mov {}, sp", out(reg) sp, options(nomem, nostack, preserves_flags)) };
    let (bottom, _) = stack_bounds();
    // Everything above `sp` is live (this function's frame and `main`'s, allocated at its
    // entry); this function calls nothing and no interrupt is enabled, so nothing below `sp`
    // is. 32 bytes of margin stay unpainted (they count as used).
    let end = sp.saturating_sub(32) & !3;
    let mut p = bottom;
    while p < end {
        // SAFETY: [bottom, sp - 32) is the unused part of the stack region: no live data,
        // word aligned (cortex-m-rt aligns `_stack_end` to 4).
        unsafe { write_volatile(p as *mut u32, STACK_PAINT) };
        p += 4;
    }
}

/// Deepest stack use since [`paint_stack`], in bytes (from the top of the stack).
fn stack_high_water() -> usize {
    let (bottom, top) = stack_bounds();
    let mut p = bottom;
    // SAFETY: reads words of the stack region below the live frames (and stops at the
    // first word that is not paint, at the latest at the current frame).
    while p < top && unsafe { read_volatile(p as *const u32) } == STACK_PAINT {
        p += 4;
    }
    top.saturating_sub(p)
}

#[entry]
fn main() -> ! {
    paint_stack();
    let Some(core) = cortex_m::Peripherals::take() else { fail() };
    let mut syst = core.SYST;
    syst.set_clock_source(SystClkSource::Core);
    syst.set_reload(0x00FF_FFFF);
    syst.clear_current();
    syst.enable_counter();

    // SAFETY: the two UARTs of the board, each driven by one handle only.
    let mut link = unsafe { Uart::new(UART0_BASE, 115_200) };
    let mut console = unsafe { Uart::new(UART1_BASE, 115_200) };
    let mut out = Report(&mut console);
    let _ = fmt::Write::write_str(
        &mut out,
        "# flsl-firmware-board: mps2-an386 (Cortex-M4F); reading the stream from UART0\n",
    );
    let Some(len) = read_length(&mut link) else {
        let _ = fmt::Write::write_str(&mut out, "# bad or missing length header on UART0\n");
        fail()
    };

    let outcome = harness::run(Take { inner: link, remaining: len }, &mut out);

    let (bottom, top) = stack_bounds();
    let used = stack_high_water();
    let ok = outcome.end == harness::End::Eof && outcome.bytes == u64::from(len);
    let _ = fmt::Write::write_fmt(
        &mut out,
        format_args!(
            "# stream {len} B, replayed {} B in {} ms virtual: {}\n\
             # stack high-water mark: {used} B (of {} B)\n",
            u32::try_from(outcome.bytes).unwrap_or(u32::MAX),
            outcome.now_ms,
            if ok { "ok" } else { "INCOMPLETE" },
            top.saturating_sub(bottom),
        ),
    );
    let _ = console.flush();
    debug::exit(if ok { EXIT_SUCCESS } else { EXIT_FAILURE });
    fail()
}

/// Exits through semihosting with a failure code (and stops if that does not end qemu).
fn fail() -> ! {
    debug::exit(EXIT_FAILURE);
    loop {
        cortex_m::asm::wfi();
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // A fixed message only: the panic payload and location are not printed.
    cortex_m_semihosting::hprintln!("flsl-firmware-board: panic");
    fail()
}

#[exception]
unsafe fn HardFault(_frame: &ExceptionFrame) -> ! {
    cortex_m_semihosting::hprintln!("flsl-firmware-board: hard fault");
    fail()
}
