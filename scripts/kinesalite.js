// Serves the Kinesis API in memory (kinesalite, from npm) on 127.0.0.1:PORT, for
// the tests: `node scripts/kinesalite.js PORT [--throttle-get-records N]`, with
// NODE_PATH pointing at the node_modules that scripts/deps.sh installs. Streams turn
// ACTIVE (and reshards finish) after 50 ms.
//
// --throttle-get-records N answers every Nth GetRecords call as the service does
// when a shard's read limit is exceeded (HTTP 400,
// ProvisionedThroughputExceededException) instead of serving it: kinesalite has no
// limits of its own. Each such answer prints `throttled K` on stdout.
const kinesalite = require('kinesalite');

const port = Number(process.argv[2]);
if (!Number.isInteger(port) || port <= 0) {
  console.error('usage: node scripts/kinesalite.js PORT [--throttle-get-records N]');
  process.exit(2);
}
let throttleEvery = 0;
if (process.argv[3] === '--throttle-get-records') {
  throttleEvery = Number(process.argv[4]);
  if (!Number.isInteger(throttleEvery) || throttleEvery < 1) {
    console.error('--throttle-get-records takes a whole number from 1');
    process.exit(2);
  }
} else if (process.argv.length > 3) {
  console.error(`unknown argument ${process.argv[3]}`);
  process.exit(2);
}
const server = kinesalite({
  createStreamMs: 50,
  deleteStreamMs: 50,
  updateStreamMs: 50,
  shardLimit: 100,
});
if (throttleEvery > 0) {
  const serve = server.listeners('request');
  server.removeAllListeners('request');
  let calls = 0;
  let throttled = 0;
  server.on('request', (req, res) => {
    const getRecords = req.headers['x-amz-target'] === 'Kinesis_20131202.GetRecords';
    if (getRecords && ++calls % throttleEvery === 0) {
      req.resume();
      req.on('end', () => {
        throttled += 1;
        const body = JSON.stringify({
          __type: 'ProvisionedThroughputExceededException',
          message: 'Rate exceeded for shard (scripts/kinesalite.js --throttle-get-records)',
        });
        res.writeHead(400, {
          'Content-Type': 'application/x-amz-json-1.1',
          'Content-Length': Buffer.byteLength(body),
          'x-amzn-RequestId': `throttled-${throttled}`,
        });
        res.end(body);
        console.log(`throttled ${throttled}`);
      });
      return;
    }
    for (const h of serve) h.call(server, req, res);
  });
}
server.listen(port, '127.0.0.1', (err) => {
  if (err) {
    console.error(`kinesalite: ${err}`);
    process.exit(1);
  }
  console.log(`kinesalite listening on 127.0.0.1:${port}`);
});
