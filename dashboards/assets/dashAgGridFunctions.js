// Value formatters for the dashboard's AG Grid tables (dashboards/widgets.py `column`): bytes in
// KiB/MiB/GiB, FLOPs with SI prefixes, seconds as ms/s/min/h, numbers to 4 significant digits.
var dagfuncs = (window.dashAgGridFunctions = window.dashAgGridFunctions || {});

function missing(v) {
    return v === null || v === undefined || (typeof v === "number" && !isFinite(v));
}

function digits(v) {
    return Math.abs(v) >= 100 ? v.toFixed(0) : String(Number(v.toPrecision(3)));
}

dagfuncs.humanBytes = function (v) {
    if (missing(v)) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let size = Number(v), unit = 0;
    while (Math.abs(size) >= 1024 && unit < units.length - 1) { size /= 1024; unit += 1; }
    return unit === 0 ? Math.round(size) + " B" : digits(size) + " " + units[unit];
};

dagfuncs.humanSI = function (v, unit) {
    if (missing(v)) return "–";
    const prefixes = ["", "k", "M", "G", "T", "P", "E"];
    let size = Number(v), p = 0;
    while (Math.abs(size) >= 1000 && p < prefixes.length - 1) { size /= 1000; p += 1; }
    return digits(size) + " " + prefixes[p] + unit;
};

dagfuncs.humanSeconds = function (v) {
    if (missing(v)) return "–";
    const s = Number(v);
    if (Math.abs(s) < 1) return Number((s * 1000).toPrecision(3)) + " ms";
    if (Math.abs(s) < 60) return Number(s.toPrecision(3)) + " s";
    if (Math.abs(s) < 3600) return Math.floor(s / 60) + " min " + String(Math.floor(s % 60)).padStart(2, "0") + " s";
    return Math.floor(s / 3600) + " h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + " min";
};

dagfuncs.num = function (v) {
    if (missing(v)) return "–";
    if (Number.isInteger(v)) return String(v);
    return Math.abs(v) >= 10000 ? v.toFixed(0) : String(Number(v.toPrecision(4)));
};
