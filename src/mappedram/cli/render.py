"""Renderers: each turns one report into the text a person reads (JSON is the report's ``to_dict()``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mappedram import ops
    from mappedram.ops import LiveSaveReport, PassStats
    from mappedram.vm import ops as vmops

__all__ = [
    "render_info",
    "render_verify",
    "render_seal",
    "render_seal_check",
    "render_extract",
    "render_export",
    "render_save",
    "render_restore",
    "render_diff",
    "render_passes",
    "render_live",
    "render_vm_run",
    "render_vm_save",
    "render_vm_restore",
    "render_demo",
]


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError


def _hex(n: int | None) -> str:
    return "-" if n is None else f"{n:#x}"


# -- rendering -------------------------------------------------------------------------


def _render_libvirt(lv: ops.LibvirtInfo) -> list[str]:
    memory = "-"
    if lv.memory_value is not None:
        memory = f"{lv.memory_value} {lv.memory_unit}"
        if lv.memory_bytes is not None:
            memory += f" ({_human(lv.memory_bytes)})"
    cookie = "none"
    if lv.cookie_length is not None:
        cookie = f"{lv.cookie_length} bytes at {lv.xml_offset + lv.cookie_offset:#x}"
    return [
        f"libvirt save image: {lv.magic} version {lv.version} ({lv.byteorder}-endian), format {lv.format} "
        f"({lv.format_id}), was_running {'yes' if lv.was_running else 'no'}",
        f"  domain XML: {lv.xml_length} bytes at {lv.xml_offset:#x}; cookie: {cookie}; data_len {lv.data_len}",
        f"  domain: {lv.name or '-'} (uuid {lv.uuid or '-'}, type {lv.domain_type or '-'}), memory {memory}, "
        f"machine {lv.machine or '-'}, arch {lv.arch or '-'}",
        f"  QEMU stream at {lv.stream_offset:#x}",
    ]


def render_info(r: ops.InfoReport) -> str:
    lines = [
        f"file: {r.path}",
        *([] if r.libvirt is None else _render_libvirt(r.libvirt)),
        f"format: {r.format}",
        f"machine type: {r.machine_type or '(no configuration section)'}",
        f"capabilities: {', '.join(r.capabilities) or '(none)'}",
        f"file size: {_human(r.file_size)} ({r.file_size} bytes); on disk {_human(r.allocated_bytes)}",
        f"stream offset: {r.offset:#x}",
        f"page size: {r.page_size}",
        f"RAM section: id {r.ram_section_id}, MEM_SIZE {_human(r.mem_size)} ({r.mem_size} bytes), "
        f"{r.part_sections} PART section(s), SWITCHOVER_START {'yes' if r.switchover_start else 'no'}",
        "RAM blocks:",
    ]
    name_w = max([len(b.idstr) for b in r.blocks] + [5])
    if r.format == "mapped-ram+zstd":
        lines.append(f"  {'idstr':<{name_w}}  {'size':>10}  {'present':>9}  {'zero':>9}  {'frames':>7}  "
                     f"{'compressed':>10}")  # fmt: skip
        for b in r.blocks:
            lines.append(
                f"  {b.idstr:<{name_w}}  {_human(b.used_length):>10}  {b.pages_present:>9}  {b.pages_zero:>9}  "
                f"{b.zstd_frames or 0:>7}  {_human(b.zstd_region_length or 0):>10}"
            )
    elif r.format == "mapped-ram":
        lines.append(
            f"  {'idstr':<{name_w}}  {'size':>10}  {'present':>9}  {'zero':>9}  "
            f"{'bitmap_offset':>13}  {'pages_offset':>12}"
        )
        for b in r.blocks:
            lines.append(
                f"  {b.idstr:<{name_w}}  {_human(b.used_length):>10}  {b.pages_present:>9}  {b.pages_zero:>9}  "
                f"{_hex(b.bitmap_offset):>13}  {_hex(b.pages_offset):>12}"
            )
    else:
        lines.append(f"  {'idstr':<{name_w}}  {'size':>10}  {'present':>9}  {'zero':>9}  {'records':>9}")
        for b in r.blocks:
            lines.append(
                f"  {b.idstr:<{name_w}}  {_human(b.used_length):>10}  {b.pages_present:>9}  {b.pages_zero:>9}  "
                f"{b.page_records or 0:>9}"
            )
    dev = f"device state: offset {r.device_state_offset:#x}, {r.device_state_length} bytes"
    if r.devices is not None:
        dev += f", {len(r.devices)} sections"
    lines.append(dev)
    for d in r.devices or []:
        lines.append(
            f"  {d.idstr} (instance {d.instance_id}, section {d.section_id}, version {d.version_id}): "
            f"{d.length} bytes at {d.offset:#x}"
        )
    if r.vmdesc_offset is not None:
        lines.append(f"vmdesc: offset {r.vmdesc_offset:#x}, {r.vmdesc_length} bytes of JSON")
    else:
        lines.append("vmdesc: none")
    if r.seal is not None:
        s = r.seal
        lines.append(f"seal: {s.algorithm}{', keyed' if s.keyed else ''}, {s.chunks:,} chunks of "
                     f"{_human(s.chunk_bytes)} over {s.blocks} block(s), version {s.version} "
                     "(verify --data checks the data)")  # fmt: skip
    else:
        lines.append("seal: none (page data cannot be checked)")
    if r.chain is not None:
        lines.append(f"chain: {len(r.chain)} files, newest first (QEMU loads none but the last; `flatten` "
                     "writes a whole file)")  # fmt: skip
        for m in r.chain:
            parent = f", child of {m.parent}" if m.parent else ", the whole file"
            lines.append(f"  {m.path}: {m.format}, {m.pages_own:,} pages of its own, {_human(m.file_size)} "
                         f"({_human(m.allocated_bytes)} on disk){parent}")  # fmt: skip
    return "\n".join(lines)


def _mismatch_lines(mismatches: list[ops.SealMismatch], limit: int = 20) -> list[str]:
    lines = []
    for m in mismatches[:limit]:
        bitmap = "" if m.bitmap_offset is None else f" (bits: bitmap bytes {m.bitmap_offset:#x}..{m.bitmap_end:#x})"
        lines.append(f"  mismatch: {m.message}{bitmap}")
    if len(mismatches) > limit:
        lines.append(f"  ... {len(mismatches) - limit} more mismatches (--output json lists all)")
    return lines


def render_seal_check(c: ops.SealCheck) -> str:
    """One line (and a line per mismatch) of a seal check."""
    rate = f" ({_human(c.bytes_read)} read in {c.seconds:.2f} s)" if c.bytes_read else ""
    return "\n".join([f"seal: {c.status}: {c.message}{rate}", *_mismatch_lines(c.mismatches)])


def render_seal(r: ops.SealReport) -> str:
    what = f"{r.algorithm}{', keyed' if r.keyed else ''}"
    lines = [
        f"{r.path}: sealed ({what}{'; the old seal replaced' if r.replaced else ''}): {r.chunks:,} chunks of "
        f"{_human(r.chunk_bytes)}, {r.chunks_read:,} read (the others hold no stored page)",
        f"trailer at {r.trailer_offset:#x}: {r.trailer_bytes_before:,} -> {r.trailer_bytes_after:,} bytes; file size "
        f"{_human(r.file_size)}; {_human(r.bytes_read)} read in {r.seconds:.2f} s ({r.gbps:.2f} GB/s of RAM)",
    ]
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def _direct_line(reason: str) -> list[str]:
    return [f"direct-io {reason}"] if reason else []


def _sealed_line(seal: ops.SealReport | None) -> list[str]:
    if seal is None:
        return []
    return [f"sealed ({seal.algorithm}{', keyed' if seal.keyed else ''}): {seal.chunks:,} chunks, {seal.seconds:.2f} s"]


def _checked_line(check: ops.SealCheck | None) -> list[str]:
    if check is None:
        return ["seal: not checked (--no-verify-seal)"]
    if check.status == "unsealed":
        return []
    return [f"seal: {check.message} ({check.seconds:.2f} s, before the first byte was written)"]


def render_verify(r: ops.VerifyReport) -> str:
    if r.ok:
        lines = [f"{r.path}: OK ({r.format})"]
        lines += [f"  checked: {c}" for c in r.checks]
        lines += [f"  note: {n}" for n in r.notes]
        if r.seal is None or not r.seal.sealed:
            lines.append("  not checkable: page contents (the file is not sealed: QEMU's format has no checksums)")
        elif not r.data:
            lines.append("  not checked: page contents (verify --data checks them against the seal)")
        return "\n".join(lines)
    lines = [f"{r.error_text}"]
    if r.seal is not None and r.data:
        lines += _mismatch_lines(r.seal.mismatches)
    return "\n".join(lines)


def render_extract(r: ops.ExtractReport) -> str:
    lines = [
        f"{b.idstr}: {b.path} ({_human(b.used_length)}, {b.pages_written} pages written, rest are holes)"
        for b in r.blocks
    ]
    lines.append(f"{_human(r.bytes_read_logical)} in {r.seconds:.2f} s ({r.gbps:.2f} GB/s, {r.channels} channels)")
    lines += _checked_line(r.seal)
    return "\n".join(lines)


def render_export(r: ops.ExportReport) -> str:
    what = "ELF core" if r.format == "elf" else "raw guest-physical image"
    machine = f"{r.machine_type or '(no machine type)'} ({r.machine_family})"
    lines = [
        f"{r.output}: {what} of {r.source}, {machine}, {_human(r.ram_size)} of RAM in {r.ram_block!r} "
        f"({_human(r.below_4g_mem_size)} below 4 GiB, {_human(r.above_4g_mem_size)} above)",
    ]
    if r.format == "elf":
        lines.append(
            f"  {r.e_machine}, notes of {r.cpus} CPU(s), {len(r.segments)} PT_LOAD segment(s), {r.layout} data"
        )
    for s in r.segments:
        lines.append(
            f"  {s.paddr:#014x}-{s.paddr + s.size - 1:#014x}  {_human(s.size):>10}  {s.block}+{s.block_offset:#x}"
            f"  at file offset {s.file_offset:#x}"
        )
    lines.append(
        f"file size {_human(r.file_size)}, {_human(r.bytes_written)} written (the rest are holes); "
        f"{r.seconds:.2f} s ({r.gbps:.2f} GB/s, {r.channels} channels)"
    )
    lines += _checked_line(r.seal)
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def render_save(r: ops.SaveReport) -> str:
    lines = [
        f"{r.path}: {r.format}, {_human(r.ram_bytes)} of RAM ({r.machine_type}), {r.pages_written} pages written, "
        + (f"{r.pages_zero} zero pages left as holes" if r.format == "mapped-ram" else f"{r.pages_zero} ZERO records"),
        f"file size {_human(r.file_size)}; {r.channels} channel(s), direct-io {'on' if r.direct_io else 'off'}",
        f"{r.total_seconds:.2f} s ({r.gbps:.2f} GB/s): " + ", ".join(f"{k} {v:.2f} s" for k, v in r.seconds.items()),
    ]
    lines += _direct_line(r.direct_io_reason)
    lines += _sealed_line(r.seal)
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def render_compress(r: ops.CompressReport) -> str:
    lines = [
        f"{r.path}: {r.source_format} -> mapped-ram+zstd, {_human(r.ram_bytes)} of RAM, "
        f"{_human(r.stored_bytes)} of page data",
        f"file size {_human(r.file_size)} from {_human(r.source_file_bytes)}: {r.ratio:.2f}x smaller "
        f"({r.data_ratio:.2f}x the page data); {r.frames} frames of {_human(r.frame_bytes)} "
        f"({r.zero_frames} without data), zstd level {r.level}, {r.channels} thread(s)",
        f"{r.total_seconds:.2f} s ({r.gbps:.2f} GB/s of RAM): "
        + ", ".join(f"{k} {v:.2f} s" for k, v in r.seconds.items()),
        "QEMU does not load this file: `mappedram decompress` gives back one it loads",
    ]
    lines += _sealed_line(r.seal)
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def render_serve(r: ops.ServeReport) -> str:
    lines = [
        f"{r.path} -> {r.destination}: {r.mode}, {_human(r.ram_bytes)} of RAM ({r.machine_type}), "
        f"{r.pages_sent:,} pages sent ({_human(r.bytes_sent)} on the wire), {r.pages_zero:,} zero pages not sent"
        + (" unless asked for" if r.mode == "postcopy" else ""),
        f"{r.total_seconds:.2f} s: " + ", ".join(f"{k} {v:.3f} s" for k, v in r.seconds.items())
        + f"; {r.channels} reader(s), " + (f"TLS {r.tls}" if r.tls else "no TLS")
        + (", requests on the preempt channel" if r.preempt else "")
        + ("; seal checked" if r.seal == "ok" else ""),
    ]
    if r.seconds_to_run is not None:
        lines.append(f"the destination had the device state (guest runnable) {r.seconds_to_run * 1e3:.1f} ms in")
    if r.requests:
        lat = r.request_latency_us or {}
        lines.append(
            f"{r.requests:,} page requests answered ({r.pages_requested:,} pages); from request to sent: "
            f"median {lat.get('median', 0):.0f} us, p99 {lat.get('p99', 0):.0f} us, max {lat.get('max', 0):.0f} us"
        )
    if r.qemu is not None:
        lines.append("destination QEMU: " + ", ".join(f"{k} {v}" for k, v in r.qemu.items()))
    lines += [f"note: {n}" for n in r.notes]
    lines.append("serve OK: the destination loaded the stream" if r.ok else
                 f"serve NOT OK: the destination reported status {r.destination_status}")  # fmt: skip
    return "\n".join(lines)


def render_restore(r: ops.RestoreReport) -> str:
    lines = [
        f"{r.path}: restored {', '.join(r.blocks)} ({_human(r.ram_bytes)}), {r.pages_read} pages read, "
        f"{r.pages_absent} zero pages {'zeroed' if r.zero_absent else 'left untouched'}",
        f"{r.channels} channel(s), direct-io {'on' if r.direct_io else 'off'}; {r.total_seconds:.2f} s "
        f"({r.gbps:.2f} GB/s): " + ", ".join(f"{k} {v:.2f} s" for k, v in r.seconds.items()),
    ]
    lines += _direct_line(r.direct_io_reason)
    if r.skipped_blocks:
        lines.append(f"not restored (no destination given): {', '.join(r.skipped_blocks)}")
    lines += _checked_line(r.seal)
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def render_diff(r: ops.DiffReport, limit: int = 20) -> str:
    lines = [f"{r.a} vs {r.b}: {'identical RAM' if r.identical else 'RAM differs'} ({r.seconds:.2f} s)"]
    for d in r.blocks:
        size = "" if d.size_a == d.size_b else f" (sizes differ: {d.size_a} vs {d.size_b})"
        lines.append(f"  {d.idstr}: {d.pages_differ} of {max(d.size_a, d.size_b) // 4096} pages differ{size}")
        for first, count in d.ranges[:limit]:
            lines.append(f"    pages {first}..{first + count - 1} ({count})")
        if len(d.ranges) > limit:
            lines.append(f"    ... {len(d.ranges) - limit} more ranges (--output json lists all)")
    for name in r.only_in_a:
        lines.append(f"  {name}: only in {r.a}")
    for name in r.only_in_b:
        lines.append(f"  {name}: only in {r.b}")
    if r.child is not None:
        lines += render_child(r.child).splitlines()
    return "\n".join(lines)


def render_child(c: ops.ChildReport) -> str:
    lines = [
        f"{c.path}: child of {c.parent} ({c.mode}), {c.pages_changed} changed pages of {c.ram_bytes // 4096}"
        + (f" ({c.pages_changed_zero} now zero)" if c.pages_changed_zero else ""),
        f"file size {_human(c.file_size)}, {_human(c.allocated_bytes)} on disk"
        + (" (shared with the parent where unchanged)" if c.mode == "reflink" else "")
        + f", {_human(c.bytes_written)} written; {c.total_seconds:.2f} s: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in c.seconds.items()),
        f"parent digest {c.parent_digest[:16]}... ({_human(c.parent_bytes_read)} read for it)",
        "QEMU does not load a child: `mappedram flatten` writes the whole file",
    ]
    lines += _sealed_line(c.seal)
    lines += [f"note: {n}" for n in c.notes]
    return "\n".join(lines)



def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def render_passes(passes: list[PassStats]) -> list[str]:
    lines = [
        "  pass  pages sent     written        zero  written (MB)  seconds  throttle  dirtied  dirtied/s of guest run"
        "  written by"
    ]
    for p in passes:
        mark = "*" if p.stopped else " "
        dirtied = "-" if p.stopped else f"{p.pages_dirtied:,}"
        rate = "-" if p.stopped or p.run_seconds <= 0 else f"{p.dirty_rate:,.0f}"
        lines.append(
            f"  {p.index:>3}{mark} {p.pages_sent:>11,} {p.pages_written:>11,} {p.pages_zero:>11,}"
            f" {p.bytes_written / 1e6:>13,.1f} {p.seconds:>8.2f} {p.throttle:>8}% {dirtied:>8} {rate:>23}"
            f"  {'O_DIRECT extents' if p.direct_io else 'page cache'}"
        )
    lines.append("  (* with the guest stopped; dirtied: pages the guest dirtied while the pass was written;"
                 " extents also rewrite the clean pages between dirty ones)")  # fmt: skip
    for p in passes:
        if p.pages_caught:
            lines.append(f"  (pass {p.index} synced as it went: {p.pages_caught:,} of the pages it saw dirtied were"
                         " dirtied before it wrote them, and were not sent again)")  # fmt: skip
    return lines


def render_live(r: LiveSaveReport, title: str = "live save", *, judged: bool = True) -> str:
    """A live save's passes and outcome; ``judged=False`` for a comparison run held to no limit."""
    n = sum(1 for p in r.passes if not p.stopped)
    live = f"{n} live pass" if n == 1 else f"{n} live passes"
    if not judged:
        stop = f"{live}, as a comparison (not held to a downtime limit)"
    elif r.converged:
        stop = f"converged after {live} (the rest fit the downtime budget at the measured speed)"
    else:
        left = r.passes[-1].pages_sent
        stop = f"did NOT converge: stopped at the pass limit ({live}) with {left:,} pages left"
    if r.auto_converge:
        stop += f"; auto-converge on, throttle {r.final_throttle}% at the stop"
    if r.dirty_limit is not None:
        fired = next((p.index for p in r.passes if p.throttle), None)
        held = f"from pass {fired}" if fired is not None else "never needed"
        if r.sample is not None:
            held = (f"in service from the start: {r.sample.dirty_rate * 4096 / 2**20:,.0f} MiB/s dirtied"
                    f" over {r.sample.seconds:.3f} s before pass 1, {held}")  # fmt: skip
        stop += f"; dirty-limit {r.dirty_limit} MB/s ({held}), throttle {r.final_throttle}% at the stop"
    if r.bandwidth_limit:
        stop += f"; bandwidth limit {r.bandwidth_limit / 1e6:g} MB/s"
    verdict = ("met" if r.downtime_met else "MISSED") if judged else "not judged"
    lines = [
        f"{title}, {r.format}: {r.path}; {len(r.passes)} passes, {stop}",
        *render_passes(r.passes),
        f"  file {_mb(r.file_size)} = {r.growth:.3f}x the RAM ({_mb(r.ram_bytes)})"
        + (", exactly the planned layout" if r.planned_size == r.file_size else "")
        + f"; on disk {_mb(r.allocated_bytes)} ({r.allocated_bytes / r.ram_bytes:.3f}x)",
        f"  downtime {r.downtime:.3f} s" + (f", limit {r.downtime_limit:g} s: {verdict}" if judged else "")
        + (f" (the final pass was expected to take {r.expected_final:.3f} s)" if judged and r.expected_final else "")
        + (f"; dirty pages written at {r.bandwidth / 1e9:.2f} GB/s" if r.bandwidth else "") + ";"
        f" {r.channels} channel(s), direct-io {'on' if r.direct_io else 'off'};"
        f" {r.total_seconds:.2f} s in all",
    ]
    lines += [f"  {line}" for line in _direct_line(r.direct_io_reason)]
    lines += [f"  {line}" for line in _sealed_line(r.seal)]
    lines += [f"  note: {n}" for n in r.notes]
    return "\n".join(lines)


def _check_line(check: dict[str, Any]) -> str:
    ram = check["ram"]
    verdict = "OK" if check["ok"] else "FAILED"
    checksum = "matches" if check["checksum"] == check["expected_checksum"] else "DIFFERS"
    text = (
        f"{verdict}: counter {check['counter']:,}, checksum {checksum},"
        f" {ram['pages_checked']:,} data pages ({ram['mismatches']} wrong)"
    )
    bad = [name for name, good in check["registers"].items() if not good]
    if bad:
        text += "; registers wrong: " + ", ".join(bad)
    if ram.get("first_bad"):
        text += f"; first bad page {ram['first_bad']}"
    return text


def render_vm_restore(r: vmops.VmRestoreReport) -> str:
    g = r.restore
    if g.mode == "lazy":
        z = g.lazy
        how = "lazy" if z is None else (
            f"lazy: {z.pages_faulted:,} pages served on fault, {z.pages_prefetched:,} prefetched,"
            f" {z.pages_zero:,} zero; resident after {z.seconds_to_resident or 0:.2f} s ({z.fill_gbps or 0:.2f} GB/s)")
    elif g.mode == "map":
        how = (f"mapped: {g.pages_mapped:,} pages read from the file on first touch, {g.pages_zero:,} zero pages"
               f"{f', {g.stale_pages_zeroed:,} stale slots overlaid with zeros' if g.stale_pages_zeroed else ''}")
    else:
        how = f"eager: {g.pages_read:,} pages read before the guest ran"
    first = "" if r.seconds_to_first_instruction is None else (
        f"; first instruction {r.seconds_to_first_instruction * 1e3:.1f} ms after the call")
    lines = [
        f"restored {r.path} into a fresh {r.guest} guest ({r.mem_mib} MiB), {how}; ready in"
        f" {g.seconds_to_ready * 1e3:.1f} ms{first}",
    ]
    lines += [f"  {line}" for line in _checked_line(g.seal)]
    lines += [f"  note: {n}" for n in g.notes]
    if r.at_restore is not None:
        lines.append(f"  at the restore point: {_check_line(r.at_restore)}")
    if r.after is not None:
        lines.append(
            f"  resumed {r.ran_seconds:.2f} s: counter {r.counter:,} -> {r.counter_after:,}; {_check_line(r.after)}"
        )
    return "\n".join(lines)


def render_vm_run(r: vmops.VmRunReport) -> str:
    lines = [
        f"{r.guest} guest, {r.mem_mib} MiB: fill {r.fill_seconds:.2f} s; ran {r.seconds:.2f} s,"
        f" {r.counter:,} iterations ({r.iterations_per_second:,.0f}/s)",
        f"  {_check_line(r.check)}",
    ]
    if r.note:
        lines.insert(0, f"note: {r.note}")
    return "\n".join(lines)


def render_vm_save(r: vmops.VmSaveReport) -> str:
    lines = [f"note: {r.note}"] if r.note else []
    lines.append(
        f"{r.guest} guest, {r.mem_mib} MiB: fill {r.fill_seconds:.2f} s, ran {r.warmup_seconds:g} s, stopped at"
        f" iteration {r.counter:,}"
    )
    lines.append(render_live(r.save))
    if r.source_check is not None:
        lines.append(f"  the paused source: {_check_line(r.source_check)}")
    lines.append("save OK" if r.ok else "save NOT OK: " + ("the save did not converge within its downtime limit"
                                                        if not r.save.ok else "the paused source did not verify"))
    return "\n".join(lines)


def render_vm_child(r: vmops.VmChildReport) -> str:
    lines = [
        f"{r.guest} guest, {r.mem_mib} MiB, restored from {r.parent} at iteration {r.counter_from:,}, ran "
        f"{r.run_seconds:.2f} s to iteration {r.counter:,}: {r.pages_dirty:,} pages written since",
        f"paused {r.pause_seconds * 1e3:.1f} ms while the child was written",
        render_child(r.child),
        f"  the paused source: {_check_line(r.source_check)}",
        "save OK" if r.ok else "save NOT OK: the paused source did not verify",
    ]
    return "\n".join(lines)


def render_demo(r: vmops.DemoReport) -> str:
    lines = [f"note: {r.note}"] if r.note else []
    lines.append(
        f"mappedram demo: a {r.mem_mib} MiB {r.guest} guest rewriting its RAM (fill {r.fill_seconds:.2f} s,"
        f" ran {r.warmup_seconds:g} s before the save)"
    )
    lines.append(render_live(r.mapped_ram))
    title = "the same workload saved live as a legacy stream (as many passes, the same throttle)"
    lines.append(render_live(r.legacy, title, judged=False))
    m, g = r.mapped_ram, r.legacy
    lines.append(
        f"file size vs RAM, {len(m.passes)} and {len(g.passes)} passes: mapped-ram {m.growth:.3f}x"
        f" ({m.allocated_bytes / m.ram_bytes:.3f}x on disk), legacy {g.growth:.3f}x"
        f" ({g.allocated_bytes / g.ram_bytes:.3f}x on disk)"
    )
    lines += [render_vm_restore(x) for x in r.restores]
    for name, good in r.source_match.items():
        lines.append(f"  {name}: {'yes' if good else 'NO'}")
    if r.ok:
        lines.append("demo OK: the live save converged within its downtime limit and the guest restored in every"
                     " mode verified")
    else:
        lines.append("demo FAILED: " + "; ".join(r.failures))
    return "\n".join(lines)
