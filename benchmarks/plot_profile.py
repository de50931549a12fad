"""Print and plot the engine's per-step profile (``npmnv3.engine.profile`` rows)."""

from __future__ import annotations

from npmnv3.engine.profile import by_kind


def print_profile(arch, batch, rows):
    total = sum(r["ms"] for r in rows)
    floor = sum(r["floor_ms"] for r in rows)
    print(f"### MobileNetV3-{arch}, batch {batch}: {total:.2f} ms/image over the steps, "
          f"compute floor {floor:.2f} ms ({100 * floor / total:.0f} %)\n")
    print("| step | kind | MMACs | ms/image | share | floor fraction |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        macs = sum(r["macs"].values()) / 1e6
        print(f"| {r['step']} | {r['kind']} | {macs:.2f} | {r['ms']:.3f} | "
              f"{100 * r['ms'] / total:.1f} % | {100 * r['floor_frac']:.0f} % |")
    print("\n| step kind | steps | MMACs | ms/image | share | floor fraction |")
    print("|---|---:|---:|---:|---:|---:|")
    for k in by_kind(rows):
        print(f"| {k['kind']} | {k['steps']} | {k['macs'] / 1e6:.1f} | {k['ms']:.2f} | "
              f"{100 * k['ms'] / total:.1f} % | {100 * k['floor_frac']:.0f} % |")


def plot_profile(rows, title, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["step"].replace("features.", "f") for r in rows]
    ax1.bar(names, [r["ms"] for r in rows], label="measured")
    ax1.bar(names, [r["floor_ms"] for r in rows], label="compute floor (2 MACs @ 200 GFLOP/s)")
    ax1.set_ylabel("ms per image")
    ax1.tick_params(axis="x", rotation=90)
    ax1.legend()
    ax1.set_title(title)
    kinds = sorted({r["kind"] for r in rows})
    for kind in kinds:
        sel = [r for r in rows if r["kind"] == kind]
        ax2.scatter([sum(r["macs"].values()) / 1e6 for r in sel], [r["ms"] for r in sel],
                    label=kind)
    ax2.set_xlabel("MMACs per image")
    ax2.set_ylabel("ms per image")
    ax2.set_title("time vs work per step")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
