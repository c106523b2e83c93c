// Instruction fetch and the three modules' controllers (docs/isa.md, "Modules and dependency
// tokens").  Fetch reads the 128-bit instruction stream in order and hands each instruction to
// the queue of the module that executes it; each module runs its queue in order, popping the
// dependency tokens an instruction names before executing it and pushing after.
`include "hapm_config.svh"

// Fetch: one instruction per cycle from a synchronous instruction memory (data one cycle after
// the address) into the module queues; it waits while the target queue is full.
module hapm_fetch (
    input  logic         clk,
    input  logic         rst,
    input  logic         start,
    input  logic [31:0]  count,
    output logic [31:0]  imem_addr,
    input  logic [`HAPM_INSN_BITS-1:0] imem_rdata,
    input  logic [2:0]   full,      // per module
    output logic [2:0]   push,      // per module
    output logic [`HAPM_INSN_BITS-1:0] insn,
    output logic [31:0]  index,     // the instruction's position in the program (for traces)
    output logic         idle
);
  // The module that executes an instruction (isa.module_of).
  function automatic logic [1:0] module_of(input logic [`HAPM_INSN_BITS-1:0] word);
    logic [2:0] op;
    op = word[`HAPM_MEM_OPCODE_LO +: 3];
    if (op == `HAPM_OP_LOAD)
      module_of = word[`HAPM_MEM_BUFFER_LO +: 2] == `HAPM_BUF_ACC ? `HAPM_MOD_COMPUTE : `HAPM_MOD_LOAD;
    else if (op == `HAPM_OP_STORE) module_of = `HAPM_MOD_STORE;
    else if (op == `HAPM_OP_SYNC) module_of = word[`HAPM_SYNC_MODULE_LO +: 2];
    else module_of = `HAPM_MOD_COMPUTE;
  endfunction

  logic [31:0] pc, cur;
  logic        have, running;
  logic [1:0]  target;
  assign insn = imem_rdata;
  assign index = cur;
  assign target = module_of(imem_rdata);
  logic go;
  assign go = have && !full[target];
  always_comb begin
    push = '0;
    if (go) push[target] = 1'b1;
  end
  assign imem_addr = (have && !go) ? cur : pc;  // hold: read the same instruction again
  assign idle = !running && !have;
  always_ff @(posedge clk) begin
    if (rst) begin
      running <= 1'b0;
      have <= 1'b0;
    end else if (start) begin
      running <= 1'b1;
      pc <= '0;
      have <= 1'b0;
    end else if (running || have) begin
      if (!have || go) begin
        if (running && pc < count) begin
          have <= 1'b1;
          cur <= pc;
          pc <= pc + 1;
        end else begin
          have <= 1'b0;
          running <= 1'b0;
        end
      end
    end
  end
endmodule

// The load or the store module: LOAD into inp / wgt (or STORE) through its DMA, and SYNC.
// Tokens: the load module pops compute->load (pop_next) and pushes load->compute (push_next);
// the store module pops compute->store (pop_prev) and pushes store->compute (push_prev).
module hapm_access #(parameter int MODULE = `HAPM_MOD_LOAD) (
    input  logic         clk,
    input  logic         rst,
    input  logic         head_valid,
    input  logic [`HAPM_INSN_BITS-1:0] head,
    output logic         head_pop,
    input  logic         token_ready,  // the queue this module pops holds a token
    output logic         token_pop,
    output logic         token_push,
    output logic         dma_start,
    input  logic         dma_done,
    output logic         idle,
    output logic         error,        // a token flag this module cannot have
    output logic         ended         // the instruction started last ends this cycle
);
  localparam bit IS_LOAD = MODULE == `HAPM_MOD_LOAD;
  logic running, push_q;
  logic pops, pushes, bad, is_sync;
  assign pops = IS_LOAD ? head[`HAPM_MEM_POP_NEXT_LO] : head[`HAPM_MEM_POP_PREV_LO];
  assign pushes = IS_LOAD ? head[`HAPM_MEM_PUSH_NEXT_LO] : head[`HAPM_MEM_PUSH_PREV_LO];
  assign bad = IS_LOAD ? head[`HAPM_MEM_POP_PREV_LO] | head[`HAPM_MEM_PUSH_PREV_LO]
                       : head[`HAPM_MEM_POP_NEXT_LO] | head[`HAPM_MEM_PUSH_NEXT_LO];
  assign is_sync = head[`HAPM_MEM_OPCODE_LO +: 3] == `HAPM_OP_SYNC;
  assign head_pop = head_valid && !running && (!pops || token_ready);
  assign token_pop = head_pop && pops;
  assign dma_start = head_pop && !is_sync;
  // A SYNC pushes in the cycle it pops; a transfer pushes when its DMA is done.
  assign token_push = (head_pop && is_sync && pushes) || (running && dma_done && push_q);
  assign idle = !running;
  assign ended = (head_pop && is_sync) || (running && dma_done);
  always_ff @(posedge clk) begin
    if (rst) begin
      running <= 1'b0;
      error <= 1'b0;
    end else begin
      if (head_pop && bad) error <= 1'b1;
      if (dma_start) begin
        running <= 1'b1;
        push_q <= pushes;
      end else if (dma_done) running <= 1'b0;
    end
  end
endmodule
