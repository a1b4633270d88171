// A temperature and humidity sensor's codec, written for lorastream's tests in the style of the
// TTN device repository (vendor/<vendor>/<model>.js): ES5, helper functions, Math, typed
// arrays, TS013 decodeUplink / encodeDownlink / decodeDownlink.
//
// Uplink on FPort 2 (11 bytes, big-endian):
//   0-1  battery: 2 status bits, 14 bits mV
//   2-3  internal temperature, 0.01 degC, signed
//   4-5  humidity, 0.1 %RH
//   6    external sensor type (0 none, 1 temperature probe), bit 7: probe disconnected
//   7-8  external temperature, 0.01 degC, signed (0x7FFF: no reading)
//   9-10 sequence number
// Downlink on FPort 3: 0x01 + interval in seconds (3 bytes).

var SENSOR_TYPES = ['none', 'temperature'];

function round(value, decimals) {
  var f = Math.pow(10, decimals);
  return Math.round(value * f) / f;
}

function int16(bytes, i) {
  var v = (bytes[i] << 8) | bytes[i + 1];
  return v > 0x7fff ? v - 0x10000 : v;
}

function batteryStatus(bits) {
  switch (bits) {
    case 0: return 'ultra low';
    case 1: return 'low';
    case 2: return 'ok';
    default: return 'good';
  }
}

function decodeUplink(input) {
  var bytes = input.bytes;
  if (input.fPort !== 2) {
    return { errors: ['unknown FPort ' + input.fPort] };
  }
  if (bytes.length < 11) {
    return { errors: ['payload too short: ' + bytes.length + ' bytes, 11 expected'] };
  }
  var view = new DataView(new Uint8Array(bytes).buffer);
  var data = {};
  var warnings = [];
  data.battery_v = round((view.getUint16(0) & 0x3fff) / 1000, 3);
  data.battery_status = batteryStatus(bytes[0] >> 6);
  data.temperature = round(view.getInt16(2) / 100, 2);
  data.humidity = round(view.getUint16(4) / 10, 1);
  data.ext_sensor = SENSOR_TYPES[bytes[6] & 0x7f] || 'unknown';
  if (bytes[6] & 0x80) {
    warnings.push('external probe disconnected');
  } else if (int16(bytes, 7) !== 0x7fff) {
    data.ext_temperature = round(int16(bytes, 7) / 100, 2);
  }
  data.sequence = view.getUint16(9);
  data.received_hour = input.recvTime.getUTCHours();
  if (data.battery_v < 2.5) {
    warnings.push('battery low');
  }
  return { data: data, warnings: warnings };
}

function encodeDownlink(input) {
  var s = input.data.interval_s;
  if (typeof s !== 'number' || s < 1 || s > 0xffffff) {
    return { errors: ['interval_s must be 1..16777215 seconds'] };
  }
  return { bytes: [0x01, (s >> 16) & 0xff, (s >> 8) & 0xff, s & 0xff], fPort: 3 };
}

function decodeDownlink(input) {
  var b = input.bytes;
  return { data: { interval_s: (b[1] << 16) | (b[2] << 8) | b[3] } };
}
