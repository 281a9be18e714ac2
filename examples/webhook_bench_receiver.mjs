// The webhook benchmark's receiver (examples/webhook_bench.sh): Node's own
// HTTP server, reading each request and answering 200, for the sink and
// for wrk alike.
import http from 'node:http';

const port = Number(process.argv[2]);
http
  .createServer((request, response) => {
    request.on('data', () => {});
    request.on('end', () => {
      response.writeHead(200, { 'content-type': 'text/plain' });
      response.end('ok');
    });
  })
  .listen(port, '127.0.0.1', () => console.log('READY'));
