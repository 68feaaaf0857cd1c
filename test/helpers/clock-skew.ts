/**
 * Preloaded into a server process (`node --require`): its `Date.now()` runs
 * CLOCK_SKEW_MS off the machine's, as on a host whose clock has drifted.
 */
const skewMs = Number(process.env.CLOCK_SKEW_MS ?? '0')
const machineNow = Date.now.bind(Date)
Date.now = () => machineNow() + skewMs
